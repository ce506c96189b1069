"""Big and malformed tensors against a real server, with an honest caller (tests/prober.py) beside
each: a refusal comes before the work it refuses, big tensors are decoded, run and encoded off the
event loop, memory stays within a small factor of the request, and request ids are bounded strings."""

import json
import struct
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import orjson
import pytest
from onnx import helper

from server import protocol
from server.frontend.grpc_codec import _varint
from server.frontend.wire_walk import MAX_FIELDS
from tests import onnx_models
from tests.conftest import start_server, wait_until
from tests.prober import Prober, cpu_seconds, resident_bytes

MIB = 1 << 20
WORST_MS = 300  # what another caller may wait while an attack runs
ELEMENT = b"x" * 12  # valid requests: 32 rows x 32768 elements of 12 bytes, 16 MiB raw; 2^20 elements, the most allowed
ROWS, COLUMNS = 32, 32768
# A BYTES element lives as a Python str going in and coming out (~60 bytes each however short) and
# as two onnxruntime std::strings (~50 bytes each): what a request may cost beyond its bytes.
PER_ELEMENT = 300
PER_JSON_VALUE = 50  # a JSON value becomes a Python object (a float is 24 bytes, and 8 in its list)
OPTIONS = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
# A model of HEAVY_ROUNDS Sin over FP32 [batch, n], on one thread: a few us for a few values, ~0.5 s
# for HEAVY_VALUES. Batches measured shorter than 100 ms may run on the event loop.
HEAVY_ROUNDS, HEAVY_VALUES = 64, 4 << 20
HEAVY_CONFIG = """max_batch_size: 4
parameters { key: "inline_run_below_us" value { string_value: "100000" } }
parameters { key: "intra_op_thread_count" value { string_value: "1" } }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "add_one", onnx_models.add_one())
    onnx_models.write(repository, "strings", onnx_models.identity("BYTES", shape=("batch", "n")))
    onnx_models.write(repository, "numbers", onnx_models.identity("FP32", shape=("batch", "n")))
    onnx_models.write(repository, "cubes", onnx_models.identity("FP32", shape=("batch", "a", "b")))
    onnx_models.write(repository, "heavy", heavy(), HEAVY_CONFIG)
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def heavy():
    nodes = [helper.make_node("Sin", [f"s{index}"], [f"s{index + 1}"]) for index in range(HEAVY_ROUNDS)]
    nodes[0].input[0], nodes[-1].output[0] = "input", "output"
    io = [onnx_models._io(name, "FP32", ("batch", "n")) for name in ("input", "output")]
    return onnx_models._model(nodes, io[:1], io[1:])


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.url, options=OPTIONS) as opened:
        yield opened


@pytest.fixture(scope="module")
def infer(channel):
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda message: message if isinstance(message, bytes) else message.SerializeToString(),
        response_deserializer=protocol.ModelInferResponse.FromString,
    )


@pytest.fixture(scope="module")
def infer_bytes(channel):
    """ModelInfer from bytes to bytes: the test's own protobuf work stays out of the measured time."""
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")


class Watch:
    """The server's peak resident memory and CPU seconds while a block runs, beside a prober."""

    def __init__(self, server) -> None:
        self.pid = server.process.pid
        self.peak = self.baseline = resident_bytes(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, resident_bytes(self.pid))

    def __enter__(self) -> "Watch":
        self.cpu_before = cpu_seconds(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, resident_bytes(self.pid))
        self.cpu = cpu_seconds(self.pid) - self.cpu_before

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def least_cpu(server, call, tries: int = 3) -> float:
    """The fewest server CPU seconds `call()` took in `tries`: on a loaded machine the noise (other
    threads' wake-ups, a colder cache) only ever adds, so the least is the closest to the work."""
    least = float("inf")
    for _ in range(tries):
        with Watch(server) as watch:
            call()
        least = min(least, watch.cpu)
    return least


def refused(infer, message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        infer(message, timeout=60)
    return caught.value


def quiet(server, attack, tries: int = 2):
    """Run `attack()` beside a prober and a memory watch; assert nobody else stalled. A stall the
    attack causes comes back every time; a busy CI machine's hiccup does not, so one clean try of
    `tries` is enough."""
    waits = []
    for _ in range(tries):
        with Prober(server.url, server.http_url, "add_one") as probe, Watch(server) as watch:
            result = attack()
        assert not probe.failures, probe.failures[:3]
        waits.append(round(probe.worst_ms()))
        if waits[-1] < WORST_MS:
            return result, watch
    raise AssertionError(f"another caller waited {waits} ms, in every try")


def bytes_request(raw: bytes, shape, model="strings"):
    message = protocol.ModelInferRequest(model_name=model)
    message.inputs.add(name="input", datatype="BYTES", shape=shape)
    message.raw_input_contents.append(raw)
    return message


def packed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in elements)


def test_bytes_elements_beyond_the_shape_are_refused_before_they_are_parsed(server, infer):
    raw = packed([b"ab"]) * (32 * MIB // 6)  # 5.6M two-byte elements declared as one
    message = bytes_request(raw, [1, 1])
    error, watch = quiet(server, lambda: refused(infer, message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert "input 'input'" in details and "more than 1 elements" in details and "the shape needs 1" in details, details
    assert watch.growth < 3 * len(raw) + 50 * MIB, f"resident memory grew {watch.growth / MIB:.0f} MiB"
    # Without the prober's own work in the count, and against what the same bytes cost to receive and
    # parse for a model that does not exist (refused before decoding): parsing them all took ~1.5 s.
    refusing = least_cpu(server, lambda: refused(infer, message))
    receiving = least_cpu(server, lambda: refused(infer, bytes_request(raw, [1, 1], model="absent")))
    assert refusing < 2 * receiving + 0.2, f"refusing took {refusing:.2f} s of server CPU; receiving {receiving:.2f} s"


@pytest.mark.parametrize("element", [b"", b"a"])
def test_typed_bytes_elements_past_the_limit_are_refused_before_protobuf_builds_them(server, infer_bytes, element):
    """8M entries declared as one element: 2 or 3 bytes each on the wire, ~30 in protobuf's arena
    (242 MiB for the 15 MiB of empty ones), were parsed before the shape or the limit was looked at."""
    message = bytes_request(b"", [1, 1])
    del message.raw_input_contents[:]
    message.inputs[0].contents.bytes_contents.extend([element] * (8 << 20))
    data = message.SerializeToString()
    error, watch = quiet(server, lambda: refused(infer_bytes, data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 1048576 BYTES elements in bytes_contents; at most 1048576 per request" in error.details()
    assert watch.growth < 3 * len(data) + 50 * MIB, (
        f"resident memory grew {watch.growth / MIB:.0f} MiB for {len(data) / MIB:.0f} MiB"
    )


def test_a_flood_of_fields_is_refused_after_a_bounded_walk(server, infer_bytes):
    """100 inputs of 65,530 empty parameters entries (12.5 MiB): 6.5M fields, which took 5.8 s of
    CPU to walk when each input had a budget of its own; one budget for the message stops it early."""
    entries = b"\x22\x00" * 65530  # InferInputTensor.parameters = 4
    data = protocol.ModelInferRequest(model_name="numbers").SerializeToString()
    data += (b"\x2a" + _varint(len(entries)) + entries) * 100
    error, _ = quiet(server, lambda: refused(infer_bytes, data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and f"more than {MAX_FIELDS} fields" in error.details()
    refusing = least_cpu(server, lambda: refused(infer_bytes, data))
    receiving = least_cpu(
        server, lambda: refused(infer_bytes, bytes_request(b"\0" * len(data), [1, 1], "absent").SerializeToString())
    )
    assert refusing < 2 * receiving + 0.2, f"refusing took {refusing:.2f} s of server CPU; receiving {receiving:.2f} s"


def test_a_batch_bigger_than_any_measured_runs_in_the_thread(server, infer):
    """Small batches of a model measured quick run on the loop; a bigger one (here ~0.5 s of work)
    must not run there on the strength of those, nor a big first one on calibration's zeros."""

    def run(values: np.ndarray) -> np.ndarray:
        message = protocol.ModelInferRequest(model_name="heavy")
        message.inputs.add(name="input", datatype="FP32", shape=values.shape)
        message.raw_input_contents.append(values.tobytes())
        return np.frombuffer(infer(message, timeout=60).raw_output_contents[0], np.float32)

    expected = np.float32(0.5)
    for _ in range(HEAVY_ROUNDS):
        expected = np.sin(expected)
    small = np.full((1, 8), 0.5, np.float32)
    logged = ("'heavy'", "run on the event loop")
    assert wait_until(
        lambda: np.allclose(run(small), expected) and any(all(w in line for w in logged) for line in server.log), 30
    )
    answer, _ = quiet(server, lambda: run(np.full((1, HEAVY_VALUES), 0.5, np.float32)))
    assert np.allclose(answer, expected)


def valid_strings(element: bytes = ELEMENT) -> np.ndarray:
    return np.full((ROWS, COLUMNS), element, dtype=object)


@pytest.mark.parametrize("form, element", [("raw", ELEMENT), ("typed", b"y" * 16)])  # 16 MiB, 18 MiB
def test_large_valid_bytes_over_grpc_do_not_stall_other_callers(server, infer_bytes, form, element):
    strings = valid_strings(element)
    if form == "raw":
        message = bytes_request(packed(strings.reshape(-1).tolist()), strings.shape)
    else:
        message = bytes_request(b"", strings.shape)
        del message.raw_input_contents[:]
        message.inputs[0].contents.bytes_contents.extend(strings.reshape(-1).tolist())
    data = message.SerializeToString()
    answer, watch = quiet(server, lambda: infer_bytes(data, timeout=60))
    size, response = len(data), protocol.ModelInferResponse.FromString(answer)
    assert list(response.outputs[0].shape) == [ROWS, COLUMNS]
    assert response.raw_output_contents[0] == packed(strings.reshape(-1).tolist())
    bound = 4 * size + PER_ELEMENT * ROWS * COLUMNS + 50 * MIB
    assert watch.growth < bound, f"resident memory grew {watch.growth / MIB:.0f} MiB for {size / MIB:.0f} MiB"


def post(server, model: str, body: bytes) -> tuple[int, dict]:
    status, answer = post_bytes(server, model, body)
    return status, json.loads(answer)


def post_bytes(server, model: str, body: bytes) -> tuple[int, bytes]:
    url = f"http://{server.http_url}/v2/models/{model}/infer"
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_large_valid_bytes_as_json_do_not_stall_other_callers(server):
    text = ELEMENT.decode()
    data = [text] * (ROWS * COLUMNS)
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [ROWS, COLUMNS], "datatype": "BYTES", "data": data}]}
    ).encode()
    (status, text), watch = quiet(server, lambda: post_bytes(server, "strings", body))
    answer = json.loads(text)
    assert status == 200, answer
    assert answer["outputs"][0]["shape"] == [ROWS, COLUMNS] and answer["outputs"][0]["data"] == data
    bound = 4 * len(body) + PER_ELEMENT * ROWS * COLUMNS + 50 * MIB
    assert watch.growth < bound, f"resident memory grew {watch.growth / MIB:.0f} MiB"


def test_large_valid_numbers_as_json_do_not_stall_other_callers(server):
    values = (np.arange(32 * 65000, dtype=np.float32) / 7).reshape(32, 65000)  # 2M values (20 MB), under the cap
    inputs = [{"name": "input", "shape": list(values.shape), "datatype": "FP32", "data": values}]
    body = orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    (status, text), watch = quiet(server, lambda: post_bytes(server, "numbers", body))
    answer = orjson.loads(text)
    assert status == 200, answer
    assert np.array_equal(np.array(answer["outputs"][0]["data"], np.float32).reshape(values.shape), values)
    bound = 4 * len(body) + PER_JSON_VALUE * values.size + 50 * MIB
    assert watch.growth < bound, f"resident memory grew {watch.growth / MIB:.0f} MiB"


def small_json(request_id) -> bytes:
    inputs = [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
    return json.dumps({"id": request_id, "inputs": inputs}).encode()


@pytest.mark.parametrize("request_id", [{"a": 1}, 12, ["x"], True, "i" * 257, "i" * MIB])
def test_rest_id_that_is_not_a_short_string_is_refused(server, request_id):
    status, answer = post(server, "add_one", small_json(request_id))
    assert status == 400, answer
    assert "'id'" in answer["error"] and "model 'add_one'" in answer["error"], answer
    assert len(answer["error"]) < 1000


def test_grpc_id_too_long_is_refused_and_a_normal_id_echoes(server, infer):
    message = protocol.ModelInferRequest(model_name="add_one", id="i" * 257)
    message.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    error = refused(infer, message)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'id'" in error.details() and "256" in error.details()
    ), error
    message.id = "request-7"
    assert infer(message, timeout=10).id == "request-7"
    status, answer = post(server, "add_one", small_json("request-8"))
    assert status == 200 and answer["id"] == "request-8"


def test_more_bytes_elements_than_the_limit_are_refused_before_any_is_read(server, infer):
    message = bytes_request(b"", [32, 32769])  # 1,048,608 declared: one batch of 32 rows past 2^20
    error = refused(infer, message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares 1048608 BYTES elements; at most 1048576 per request (--max-bytes-elements)" in error.details()
    inputs = [{"name": "input", "shape": [32, 32769], "datatype": "BYTES", "data": []}]
    status, answer = post(server, "strings", json.dumps({"inputs": inputs}).encode())
    assert status == 400 and "at most 1048576 per request" in answer["error"], answer


def test_json_of_more_values_than_the_limit_is_refused_before_it_is_parsed(server):
    zeros = b"0," * (1 << 21) + b"0"  # 2,097,153 values: about 100 MB as Python objects
    body = b'{"inputs": [{"name": "input", "shape": [2097153, 1], "datatype": "FP32", "data": [' + zeros + b"]}]}"
    with Watch(server) as watch:
        status, answer = post(server, "numbers", body)
    assert status == 400 and "--max-json-values" in answer["error"] and "model 'numbers'" in answer["error"], answer
    assert watch.growth < 3 * len(body) + 50 * MIB, f"resident memory grew {watch.growth / MIB:.0f} MiB"
    refusing = least_cpu(server, lambda: post(server, "numbers", body))
    receiving = least_cpu(server, lambda: post(server, "absent", body))  # refused before the body is read as JSON
    assert refusing < 2 * receiving + 0.2, f"refusing took {refusing:.2f} s of server CPU; receiving {receiving:.2f} s"


def numbers_request(**fields):
    message = protocol.ModelInferRequest(**{"model_name": "numbers", **fields})
    message.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    return message


def with_parameters(count: int):
    message = numbers_request()
    for index in range(count):
        message.parameters[f"k{index}"].int64_param = index
    return message


def with_outputs(names: list[str]):
    message = numbers_request()
    for name in names:
        message.outputs.add(name=name)
    return message


def with_shape(shape, model="numbers"):
    message = numbers_request(model_name=model)
    message.inputs[0].shape[:] = shape
    message.raw_input_contents[0] = b""
    return message


@pytest.mark.parametrize(
    "message, fragment",
    [
        (with_parameters(65), "'parameters' has 65 entries; at most 64 (--max-request-parameters)"),
        (with_outputs(["output"] * 1000), "output 'output' is requested more than once"),
        (
            with_shape([1, 0, 2**62], "cubes"),
            "shape [1, 0, 4611686018427387904] declares more than 1099511627776 elements",
        ),
        (with_shape([1] * 100_000), "an input's shape has more than 64 dims"),
        (with_shape([1] * 65), "shape [1, 1, 1, 1, 1, 1, 1, 1, ... (65 dims)] has 65 dims; expected [-1, -1]"),
        (b"\x32\x00" * 70_000, f"the request has more than {MAX_FIELDS} fields"),  # 70000 empty requested outputs
        (numbers_request(model_name="m" * 100_000), "the model name is 100000 bytes long; at most 255"),
        (numbers_request(model_version="1" * 300), "the model version is 300 characters long; at most 255"),
        (b"\x3a\xff\xff\xff\x0f", "is not a valid ModelInferRequest message"),
    ],
)
def test_requests_past_other_bounds_are_refused_in_few_words(infer, message, fragment):
    error = refused(infer, message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details(), error.details()
    assert len(error.details()) < 400, error.details()
    assert infer(numbers_request(id="after"), timeout=10).id == "after"


@pytest.mark.parametrize("values", [2, 20_000])  # 8 bytes, parsed whole by protobuf; 80 KB, walked first
def test_an_unknown_group_is_skipped_whatever_the_message_size(infer_bytes, values):
    message = numbers_request(id=f"values-{values}")
    message.inputs[0].shape[:] = [1, values]
    message.raw_input_contents[0] = np.zeros(values, np.float32).tobytes()
    answer = infer_bytes(message.SerializeToString() + b"\x7b\x08\x01\x7c", timeout=10)  # field 15, a group of a varint
    assert protocol.ModelInferResponse.FromString(answer).id == f"values-{values}"


def stream_call(server):
    channel = grpc.insecure_channel(server.url, options=OPTIONS)
    return channel, channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=protocol.ModelStreamInferResponse.FromString,
    )


def test_large_bytes_on_a_stream_are_answered_without_stalling_and_bad_ids_refused(server):
    strings = valid_strings()
    big = bytes_request(packed(strings.reshape(-1).tolist()), strings.shape)
    big.id = "big"
    channel, call = stream_call(server)
    with channel:
        requests = [numbers_request(id="i" * 300), big, numbers_request(id="small")]
        answers, _ = quiet(server, lambda: list(call(iter(requests), timeout=60)))
    assert "'id' (300 characters) is longer than 256 bytes" in answers[0].error_message
    by_id = {answer.infer_response.id: answer for answer in answers[1:]}
    assert not by_id["big"].error_message and not by_id["small"].error_message
    assert by_id["big"].infer_response.raw_output_contents[0] == big.raw_input_contents[0]


def test_the_limits_follow_their_flags(tmp_path, serve):
    onnx_models.write(tmp_path, "strings", onnx_models.identity("BYTES", shape=("batch", "n")))
    running = serve(tmp_path, "--max-bytes-elements", "4", "--max-id-bytes", "8", "--max-request-parameters", "1")
    with grpc.insecure_channel(running.url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=protocol.ModelInferResponse.FromString,
        )
        assert call(bytes_request(packed([b"a"] * 4), [1, 4]), timeout=10).outputs[0].shape == [1, 4]
        for message, fragment in [
            (bytes_request(packed([b"a"] * 5), [1, 5]), "declares 5 BYTES elements; at most 4"),
            (protocol.ModelInferRequest(model_name="strings", id="123456789"), "longer than 8 bytes"),
        ]:
            assert fragment in refused(call, message).details()
    header = {"id": "r", "parameters": {"a": 1, "b": 2}, "inputs": []}
    status, answer = post(running, "strings", json.dumps(header).encode())
    assert status == 400 and "at most 1 (--max-request-parameters)" in answer["error"], answer
