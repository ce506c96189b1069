"""Sequence batching as Triton users drive it: tritonclient's sequence_id, sequence_start and
sequence_end over gRPC, streams and REST, against stand-ins for Triton's sequence example models
and an accumulator whose state the server keeps between the requests of each sequence."""

import concurrent.futures
import queue
import random
import threading
import time
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import sequence_models
from tests.conftest import start_server, wait_until

VALUES = [11, 7, 5, 3, 2, 0, 1]  # what NVIDIA's sequence examples send after a first value
MODULES = {"grpc": grpcclient, "http": httpclient}
EXPLICIT = ("--model-control-mode", "explicit")
BOUND = 'parameters { key: "io_binding" value: { string_value: "1" } }\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    sequence_models.write_examples(repository)
    sequence_models.write_accumulator(repository)
    idle = "max_sequence_idle_microseconds: 300000\n"
    sequence_models.write_accumulator(repository, "forgetful", extra=idle)
    one_slot = "oldest { max_candidate_sequences: 1 }"
    sequence_models.write_accumulator(repository, "one_slot", strategy=one_slot)
    direct = sequence_models.INSTANCES.format(count=2)
    sequence_models.write_accumulator(repository, "direct", strategy="direct { }", after=direct)
    # Through IO binding on the CPU, as CUDA instances run: the state stays on the instance's device
    sequence_models.write_accumulator(repository, "bound", after=BOUND)
    sequence_models.write_accumulator(repository, "bound_direct", strategy="direct { }", after=direct + BOUND)
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def client_of(server, protocol: str):
    url = server.url if protocol == "grpc" else server.http_url
    return MODULES[protocol].InferenceServerClient(url)


def value_input(module, value: int):
    tensor = module.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.full((1, 1), value, dtype=np.int32))
    return tensor


def send(client, module, model: str, sequence_id, value: int, start=False, end=False) -> int:
    result = client.infer(
        model, [value_input(module, value)], sequence_id=sequence_id, sequence_start=start, sequence_end=end
    )
    return int(result.as_numpy("OUTPUT")[0][0])


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def expected(model: str, key, sent: list[int]) -> list[int]:
    """What the example programs check: simple_sequence answers INPUT + START, simple_dyna_sequence
    adds the id at END, and simple_string_dyna_sequence accumulates and adds the id at END."""
    if model == "simple_string_dyna_sequence":
        answers = [int(total) for total in np.cumsum(sent)]
    else:
        answers = [sent[0] + 1] + sent[1:]
    if model != "simple_sequence":
        answers[-1] += int(key)
    return answers


@pytest.mark.parametrize("dyna", [False, True], ids=["simple_sequence", "dyna"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_examples_three_sequences_interleaved_each_answer_as_against_triton(server, protocol, dyna):
    module, client = MODULES[protocol], client_of(server, protocol)
    string_id = "1002" if dyna else str(uuid.uuid4())
    int_model = "simple_dyna_sequence" if dyna else "simple_sequence"
    string_model = "simple_string_dyna_sequence" if dyna else "simple_sequence"
    sequences = [(int_model, 1000, [0] + VALUES), (int_model, 1001, [100] + [-v for v in VALUES])]
    sequences.append((string_model, string_id, [20] + [-v for v in VALUES]))
    answers: dict = {key: [] for _, key, _ in sequences}
    last = len(VALUES)
    for step in range(last + 1):  # one request of each sequence in turn: state must not cross
        for model, key, sent in sequences:
            answers[key].append(send(client, module, model, key, sent[step], start=step == 0, end=step == last))

    for model, key, sent in sequences:
        assert answers[key] == expected(model, key, sent), (model, key)


def test_a_streams_sequences_answer_in_order_with_their_request_ids(server):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    keys = (2000, 2001, "stream-sequence")
    try:
        for step in range(len(VALUES) + 1):
            for key in keys:
                value = 0 if step == 0 else VALUES[step - 1]
                client.async_stream_infer(
                    "accumulator",
                    [value_input(grpcclient, value)],
                    request_id=f"{key}_{step}",
                    sequence_id=key,
                    sequence_start=step == 0,
                    sequence_end=step == len(VALUES),
                )
        received = [answers.get(timeout=30) for _ in range(len(keys) * (len(VALUES) + 1))]
    finally:
        client.stop_stream()
    assert [error for _, error in received if error is not None] == []
    by_key: dict = {str(key): [] for key in keys}
    for result, _ in received:
        key, step = result.get_response().id.rsplit("_", 1)
        by_key[key].append((int(step), int(result.as_numpy("OUTPUT")[0][0])))
    running_sums = [int(total) for total in np.cumsum([0] + VALUES)]
    for key in by_key:
        assert by_key[key] == list(enumerate(running_sums)), key


@pytest.mark.parametrize("model", ["accumulator", "direct", "bound", "bound_direct"])
def test_interleaved_sequences_from_many_clients_keep_their_own_state(server, model):
    errors, callers = [], 8

    def caller(index: int) -> None:
        rng = random.Random(index)
        client = grpcclient.InferenceServerClient(server.url)
        key, total = 10_000 + index + 100 * ["accumulator", "direct", "bound", "bound_direct"].index(model), 0
        for step in range(25):
            value = rng.randint(-50, 50)
            total += value
            try:
                got = send(client, grpcclient, model, key, value, start=step == 0, end=step == 24)
            except InferenceServerException as err:  # the thread would end silently: the test reports it
                got = err.message()
            if got != total:
                errors.append((key, step, got, total))

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert server.metric("onnxserve_sequences_live", model=model, version="1") == 0
    kept = "on each instance's device" if model.startswith("bound") else "in host memory"
    assert f"model '{model}' version 1: sequences' implicit state kept {kept}" in server.log_text()
    assert server.metric("onnxserve_sequences_total", model=model, version="1", change="ended") >= callers


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_outside_a_sequence_get_tritons_errors(server, protocol):
    module, client = MODULES[protocol], client_of(server, protocol)
    code = "INVALID_ARGUMENT" if protocol == "grpc" else "400"

    error = refused(lambda: client.infer("accumulator", [value_input(module, 1)]))
    assert code in str(error.status())
    assert "must specify a non-zero or non-empty correlation ID" in error.message()
    assert "'accumulator'" in error.message()

    error = refused(lambda: send(client, module, "accumulator", 31337, 1))
    assert "sequence 31337" in error.message() and "must specify the START flag" in error.message()

    rows = module.InferInput("INPUT", [2, 1], "INT32")
    rows.set_data_from_numpy(np.ones((2, 1), dtype=np.int32))
    error = refused(lambda: client.infer("accumulator", [rows], sequence_id=5, sequence_start=True))
    assert "batch-size 1" in error.message() and "got 2" in error.message()

    assert send(client, module, "accumulator", 5, 4, start=True, end=True) == 4  # and it still serves


def test_an_idle_sequence_ends_and_its_next_request_is_told_why(server):
    client = grpcclient.InferenceServerClient(server.url)
    before = server.metric("onnxserve_sequences_total", model="forgetful", version="1", change="timed_out")
    assert send(client, grpcclient, "forgetful", 77, 5, start=True) == 5
    assert send(client, grpcclient, "forgetful", 77, 1) == 6
    assert wait_until(
        lambda: (
            server.metric("onnxserve_sequences_total", model="forgetful", version="1", change="timed_out") == before + 1
        ),
        timeout=5,
    )
    error = refused(lambda: send(client, grpcclient, "forgetful", 77, 1))
    assert "must specify the START flag" in error.message()
    assert "no request for 300000 us (max_sequence_idle_microseconds)" in error.message()
    assert server.metric("onnxserve_sequences_live", model="forgetful", version="1") == 0
    assert send(client, grpcclient, "forgetful", 77, 2, start=True, end=True) == 2  # started anew, from zeros


def test_a_sequence_beyond_the_live_bound_waits_for_a_slot(server):
    client = grpcclient.InferenceServerClient(server.url)
    assert send(client, grpcclient, "one_slot", 1, 10, start=True) == 10
    answered: queue.Queue = queue.Queue()

    def second() -> None:
        other = grpcclient.InferenceServerClient(server.url)
        answered.put(send(other, grpcclient, "one_slot", 2, 3, start=True, end=True))

    thread = threading.Thread(target=second)
    thread.start()
    assert wait_until(lambda: server.metric("onnxserve_sequences_waiting", model="one_slot", version="1") == 1)
    time.sleep(0.2)
    assert answered.empty()  # the first sequence holds the only slot
    assert send(client, grpcclient, "one_slot", 1, 1, end=True) == 11
    assert answered.get(timeout=10) == 3
    thread.join(10)
    assert server.metric("onnxserve_sequences_live", model="one_slot", version="1") == 0


def test_the_config_shows_sequence_batching_and_the_metadata_hides_controls_and_state(server):
    client = grpcclient.InferenceServerClient(server.url)
    config = client.get_model_config("simple_dyna_sequence", as_json=True)["config"]
    batching = config["sequence_batching"]
    assert batching["oldest"]["max_candidate_sequences"] == 1024
    # JSON leaves out a field at its default, as Triton's does: START is kind 0
    kinds = [control["control"][0].get("kind", "CONTROL_SEQUENCE_START") for control in batching["control_input"]]
    assert kinds == [
        "CONTROL_SEQUENCE_START",
        "CONTROL_SEQUENCE_END",
        "CONTROL_SEQUENCE_READY",
        "CONTROL_SEQUENCE_CORRID",
    ]
    metadata = client.get_model_metadata("simple_string_dyna_sequence", as_json=True)
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["INPUT"]
    assert [tensor["name"] for tensor in metadata["outputs"]] == ["OUTPUT"]


@pytest.mark.parametrize("after", ["", BOUND], ids=["host", "bound"])
def test_a_reload_keeps_sequences_with_the_same_state_and_ends_them_otherwise(tmp_path, serve, after):
    sequence_models.write_accumulator(tmp_path, after=after)
    server = serve(tmp_path, *EXPLICIT, "--load-model", "accumulator")
    client = grpcclient.InferenceServerClient(server.url)
    assert send(client, grpcclient, "accumulator", 1, 5, start=True) == 5

    client.load_model("accumulator")  # the same state: the sequence goes on
    assert send(client, grpcclient, "accumulator", 1, 2) == 7

    sequence_models.write_accumulator(tmp_path, state_name="MEMORY", after=after)
    client.load_model("accumulator")  # its state is another tensor now: the sequence ends
    error = refused(lambda: send(client, grpcclient, "accumulator", 1, 2))
    assert "reloaded with another state signature" in error.message()
    assert send(client, grpcclient, "accumulator", 1, 2, start=True) == 2
    assert server.metric("onnxserve_sequences_total", model="accumulator", version="1", change="aborted") == 1


def test_sequences_cross_front_end_processes(tmp_path, serve):
    sequence_models.write_examples(tmp_path)
    sequence_models.write_accumulator(tmp_path)
    server = serve(tmp_path, "--frontends", "2")
    for protocol in ("grpc", "http"):
        module, client = MODULES[protocol], client_of(server, protocol)
        key = f"through-{protocol}"
        answers = [send(client, module, "accumulator", key, 20, start=True)]
        answers.append(send(client, module, "accumulator", key, -5, end=True))
        assert answers == [20, 15]
        error = refused(lambda: send(client, module, "simple_dyna_sequence", key, 1, start=True))  # noqa: B023
        assert f"sequence id '{key}' cannot feed control input 'CORRID' (CORRID, UINT64)" in error.message()


def test_each_request_of_a_sequence_is_billed_its_share_as_any_request(server):
    client = grpcclient.InferenceServerClient(server.url)
    before = server.metric("onnxserve_requests_total", model="accumulator", version="1", outcome="ok", protocol="grpc")
    costs = []
    for step in range(3):
        result = client.infer(
            "accumulator",
            [value_input(grpcclient, step)],
            sequence_id="billed",
            sequence_start=step == 0,
            sequence_end=step == 2,
        )
        parameters = result.get_response().parameters
        costs.append(parameters["onnxserve_cost_dollars"].double_param)
        assert parameters["onnxserve_batch_rows"].int64_param >= 1
    assert all(cost > 0 for cost in costs)
    after = server.metric("onnxserve_requests_total", model="accumulator", version="1", outcome="ok", protocol="grpc")
    assert after == before + 3


def test_direct_holds_a_batch_until_its_minimum_slot_utilization_or_its_delay(tmp_path, serve):
    """Triton's direct strategy with a delay: a batch runs once that share of an instance's slots has
    a request ready, else when the delay is up; the default share, 0, waits for nothing."""
    one_instance = sequence_models.INSTANCES.format(count=1)
    patient = "direct { max_queue_delay_microseconds: 1000000 minimum_slot_utilization: 0.25 }"  # 2 of 8 slots
    eager = "direct { max_queue_delay_microseconds: 1000000 }"
    sequence_models.write_accumulator(tmp_path, "patient", strategy=patient, after=one_instance)
    sequence_models.write_accumulator(tmp_path, "eager", strategy=eager, after=one_instance)
    server = serve(tmp_path)
    client = grpcclient.InferenceServerClient(server.url)

    def timed(model: str, key: int, value: int, start: bool) -> tuple[int, float]:
        began = time.perf_counter()
        answer = send(client, grpcclient, model, key, value, start=start)
        return answer, time.perf_counter() - began

    answer, seconds = timed("eager", 1, 3, True)
    assert answer == 3 and seconds < 0.5
    answer, seconds = timed("patient", 1, 3, True)  # alone: 1 of 8 slots ready, held for the delay
    assert answer == 3 and seconds >= 0.9
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # 2 of 8 ready: the batch runs at once
        both = list(pool.map(lambda key: timed("patient", key, 5, key == 2), [1, 2]))
    assert [answer for answer, _ in both] == [8, 5] and all(seconds < 0.5 for _, seconds in both), both
