"""`inline_run_below_us`: a model whose batches are measured to be shorter than a thread
handoff runs them on the event loop; one slow batch sends it back to its thread, so the
next slow ones no longer hold up other calls."""

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import onnx_models
from tests.conftest import start_server, wait_until
from tests.integration.test_batching import caller_rows, inputs

INLINE = 'parameters { key: "inline_run_below_us" value { string_value: "1000" } }'
THREADED = 'parameters { key: "inline_run_below_us" value { string_value: "0" } }'
SLOW_WORK = 4000  # rounds of the slow model's loop: about a third of a second here
INLINE_LINE = "run on the event loop"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "tiny", onnx_models.add_one(), f"max_batch_size: 16\n{INLINE}")
    onnx_models.write(repository, "threaded", onnx_models.add_one(), f"max_batch_size: 16\n{THREADED}")
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), f"max_batch_size: 8\n{INLINE}")
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def inline_logged(server, model: str) -> bool:
    return any(f"'{model}'" in line and INLINE_LINE in line for line in server.log)


def drive_until_inline(server, model: str, **work) -> bool:
    """Send short requests until the model's measured runs take it onto the loop: on a busy
    machine the first runs of a new shape can take longer than the limit."""
    client, x = server.client(), caller_rows(1, 2)

    def one_more_then_look() -> bool:
        np.testing.assert_array_equal(client.infer(model, inputs(x, module=grpcclient, **work)).as_numpy("y"), x + 1)
        return inline_logged(server, model)

    return wait_until(one_more_then_look, timeout=30)


def test_short_batches_run_inline_and_every_caller_gets_its_own_rows(server):
    client = server.client()
    for _ in range(20):
        x = caller_rows(1, 2)
        np.testing.assert_array_equal(client.infer("threaded", inputs(x, module=grpcclient)).as_numpy("y"), x + 1)
    assert drive_until_inline(server, "tiny")
    assert not inline_logged(server, "threaded"), "with inline_run_below_us 0 batches stay in the thread"

    results: dict[int, np.ndarray] = {}

    def caller(index: int) -> None:
        x = caller_rows(index, 1 + index % 3)
        results[index] = client.infer("tiny", inputs(x, module=grpcclient)).as_numpy("y") - x

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(40))
    for index, difference in results.items():
        np.testing.assert_array_equal(difference, np.ones((1 + index % 3, 4), np.float32))
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["parameters"]["inline_run_below_us"]["string_value"] == "1000"


def slowest_liveness_call(server, seconds: float) -> float:
    """The longest ServerLive round trip seen while polling for `seconds`."""
    client, slowest, end = grpcclient.InferenceServerClient(server.url), 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        assert client.is_server_live()
        slowest = max(slowest, time.monotonic() - began)
        time.sleep(0.01)
    return slowest


def test_one_slow_batch_sends_the_model_back_to_its_thread(server):
    client = server.client()
    assert drive_until_inline(server, "slow", work=0)

    def slow_request() -> None:
        x = caller_rows(3, 1)
        np.testing.assert_array_equal(
            client.infer("slow", inputs(x, module=grpcclient, work=SLOW_WORK)).as_numpy("y"), x + 1
        )

    began = time.monotonic()
    slow_request()  # measured as fast so far: it runs on the loop, and shows how long it takes
    slow_seconds = time.monotonic() - began
    assert slow_seconds > 0.1, "the slow model was not slow enough to tell the difference"

    second = threading.Thread(target=slow_request)
    second.start()
    slowest = slowest_liveness_call(server, slow_seconds * 0.8)
    second.join()
    assert slowest < slow_seconds / 3, "the second slow batch held up the event loop"
