"""Every bad input gets the right status code and a message naming model, tensor,
expected and actual; the next good request still works."""

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server import protocol
from tests import onnx_models
from tests.conftest import start_server, wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "add_one", onnx_models.add_one(), "max_batch_size: 4")
    onnx_models.write(repository, "fixed", onnx_models.add_one(shape=(2, 4)))
    onnx_models.write(repository, "strings", onnx_models.identity("BYTES"))
    running = start_server(repository)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def infer(server):
    channel = grpc.insecure_channel(server.url)
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=protocol.ModelInferResponse.FromString,
    )
    yield call
    channel.close()


def request(model="add_one", name="x", datatype="FP32", shape=(1, 4), raw=None, version=""):
    message = protocol.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is None:
        raw = np.zeros(shape, dtype=np.float32).tobytes() if all(d >= 0 for d in shape) else b""
    message.raw_input_contents.append(raw)
    return message


def good_request():
    return request(raw=np.arange(4, dtype=np.float32).reshape(1, 4).tobytes())


def bytes_request(raw: bytes, shape=(1, 3)):
    return request(model="strings", name="input", datatype="BYTES", shape=shape, raw=raw)


def with_typed_and_raw():
    message = request()
    message.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    return message


def with_unknown_output():
    message = good_request()
    message.outputs.add(name="z")
    return message


def missing_input():
    return protocol.ModelInferRequest(model_name="add_one")


def unknown_input_too():
    message = good_request()
    message.inputs.add(name="extra", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    return message


CASES = [
    ("unknown model", lambda: request(model="nope"), grpc.StatusCode.NOT_FOUND, ["'nope'"]),
    ("unknown version", lambda: request(version="7"), grpc.StatusCode.NOT_FOUND, ["'add_one'", "version 7"]),
    (
        "wrong datatype",
        lambda: request(datatype="FP64", raw=np.zeros((1, 4)).tobytes()),
        INVALID,
        ["'x'", "FP64", "FP32"],
    ),
    ("unknown datatype", lambda: request(datatype="FLOAT99"), INVALID, ["'x'", "FLOAT99", "FP32"]),
    ("wrong dims", lambda: request(shape=(1, 5)), INVALID, ["'x'", "[1, 5]", "[-1, 4]"]),
    ("wrong rank", lambda: request(shape=(4,)), INVALID, ["'x'", "[4]", "[-1, 4]"]),
    ("negative dims", lambda: request(shape=(-1, 4)), INVALID, ["'x'", "negative", "[-1, 4]"]),
    ("raw size mismatch", lambda: request(raw=b"\0" * 12), INVALID, ["'x'", "12 bytes", "expected 16"]),
    ("missing input", missing_input, INVALID, ["add_one", "missing inputs ['x']"]),
    ("unknown input", unknown_input_too, INVALID, ["unknown input 'extra'", "['x']"]),
    ("unknown output", with_unknown_output, INVALID, ["unknown requested output 'z'", "['y']"]),
    ("batch too large", lambda: request(shape=(5, 4)), INVALID, ["'x'", "batch size 5", "max_batch_size (4)"]),
    (
        "extra batch dim",
        lambda: request(model="fixed", shape=(1, 2, 4)),
        INVALID,
        ["'fixed'", "[1, 2, 4]", "[2, 4]", "no batch dimension"],
    ),
    ("mixed raw and typed", with_typed_and_raw, INVALID, ["'x'", "typed contents", "raw_input_contents"]),
    ("truncated BYTES prefix", lambda: bytes_request(b"\x01\x00\x00\x00a\x02\x00"), INVALID, ["'input'", "truncated"]),
    (
        "BYTES length overrun",
        lambda: bytes_request(b"\x09\x00\x00\x00abc"),
        INVALID,
        ["'input'", "declares 9 bytes", "only 3 remain"],
    ),
    ("BYTES element count", lambda: bytes_request(b"\x01\x00\x00\x00a"), INVALID, ["'input'", "1 elements", "needs 3"]),
]


@pytest.mark.parametrize("case, make, code, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_server_keeps_serving(infer, case, make, code, fragments):
    with pytest.raises(grpc.RpcError) as error:
        infer(make())
    assert error.value.code() == code, error.value.details()
    for fragment in fragments:
        assert fragment in error.value.details()
    response = infer(good_request())
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], np.float32), np.arange(4, dtype=np.float32) + 1
    )


def test_bad_priority_and_timeout_parameters(server):
    client = server.client()
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(grpcclient.InferenceServerException) as error:
        client.infer("add_one", [x], parameters={"timeout": "soon"})
    assert "INVALID_ARGUMENT" in error.value.status()
    assert "'timeout'" in error.value.message()
    assert client.infer("add_one", [x]).as_numpy("y").tolist() == [[1, 1, 1, 1]]


def test_invalid_requests_are_counted(server, infer):
    before = server.metric("onnxserve_requests_total", model="add_one", version="1", outcome="invalid")
    with pytest.raises(grpc.RpcError):
        infer(request(shape=(1, 5)))
    # observers run on a later loop turn than the error's answer: counted soon after, not before
    assert wait_until(
        lambda: server.metric("onnxserve_requests_total", model="add_one", version="1", outcome="invalid") == before + 1
    )
