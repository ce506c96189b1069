"""ModelStreamInfer through tritonclient's stream API: every request on a stream is
answered with its own rows, requests on one stream batch together, a bad request is
answered with an error message and the stream goes on, and a cancelled stream drops
what it still had queued."""

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import onnx_models
from tests.conftest import start_server, wait_until
from tests.integration.test_batching import ADD_ONE_CONFIG, BLOCKING_WORK, SLOW_CONFIG, caller_rows, inputs

STREAM_REQUESTS = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "add_one", onnx_models.add_one(), ADD_ONE_CONFIG)
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), SLOW_CONFIG.format(queue=8))
    running = start_server(repository)
    yield running
    assert running.stop() == 0


class Stream:
    """One tritonclient stream; `answers(n)` waits for n callbacks as (result, error) pairs."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self._answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self._answers.put((result, error)))

    def send(self, model: str, tensors, request_id: str) -> None:
        self.client.async_stream_infer(model, tensors, request_id=request_id)

    def answers(self, count: int, timeout: float = 30) -> list:
        return [self._answers.get(timeout=timeout) for _ in range(count)]

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_every_request_on_a_stream_gets_its_own_rows_and_they_batch(server):
    before_ok = server.metric("onnxserve_requests_total", model="add_one", version="1", outcome="ok")
    before_batches = server.metric("onnxserve_batches_total", model="add_one", version="1")
    sent = {str(caller): caller_rows(caller, 1 + caller % 3) for caller in range(STREAM_REQUESTS)}
    stream = Stream(server.url)
    try:
        for request_id, x in sent.items():
            stream.send("add_one", inputs(x, module=grpcclient), request_id)
        answers = stream.answers(STREAM_REQUESTS)
    finally:
        stream.close()

    assert [error for _, error in answers if error is not None] == []
    by_id = {result.get_response().id: result for result, _ in answers}
    assert sorted(by_id) == sorted(sent)
    for request_id, result in by_id.items():
        np.testing.assert_array_equal(result.as_numpy("y"), sent[request_id] + 1)
    batch_rows = [result.get_response().parameters["onnxserve_batch_rows"].int64_param for result in by_id.values()]
    assert max(batch_rows) > 3, "requests on one stream should share batches"
    assert (
        server.metric("onnxserve_requests_total", model="add_one", version="1", outcome="ok")
        == before_ok + STREAM_REQUESTS
    )
    assert server.metric("onnxserve_batches_total", model="add_one", version="1") - before_batches < STREAM_REQUESTS


def test_a_bad_request_is_answered_with_an_error_and_the_stream_goes_on(server):
    before_invalid = server.metric("onnxserve_requests_total", model="add_one", version="1", outcome="invalid")
    good = caller_rows(5, 2)
    wrong_width = grpcclient.InferInput("x", [1, 3], "FP32")
    wrong_width.set_data_from_numpy(np.zeros((1, 3), np.float32))
    stream = Stream(server.url)
    try:
        stream.send("add_one", [wrong_width], "bad-shape")
        stream.send("no_such_model", inputs(good, module=grpcclient), "bad-model")
        stream.send("add_one", inputs(good, module=grpcclient), "good")
        answers = stream.answers(3)
    finally:
        stream.close()

    errors = [str(error) for _, error in answers if error is not None]
    assert len(errors) == 2
    shape_error, model_error = sorted(errors, key=lambda text: "no_such_model" in text)
    assert "'add_one'" in shape_error and "'x'" in shape_error and "[1, 3]" in shape_error
    assert "Request for unknown model: 'no_such_model'" in model_error
    (result,) = [result for result, error in answers if error is None]
    assert result.get_response().id == "good"
    np.testing.assert_array_equal(result.as_numpy("y"), good + 1)
    assert (
        server.metric("onnxserve_requests_total", model="add_one", version="1", outcome="invalid") == before_invalid + 1
    )


def test_cancelled_stream_drops_its_queued_requests_and_the_server_goes_on(server):
    before_rows = server.metric("onnxserve_inferences_total", model="slow", version="1")
    before_cancelled = server.metric("onnxserve_requests_total", model="slow", version="1", outcome="cancelled")
    stream = Stream(server.url)
    stream.send("slow", inputs(caller_rows(0, 1), module=grpcclient, work=BLOCKING_WORK), "blocker")
    assert wait_until(lambda: server.metric("onnxserve_inflight_requests", model="slow", version="1") == 1)
    for caller in range(1, 4):
        stream.send("slow", inputs(caller_rows(caller, 2), module=grpcclient, work=0), str(caller))
    assert wait_until(lambda: server.metric("onnxserve_queue_depth", model="slow", version="1") == 3)
    stream.close(cancel=True)

    assert wait_until(lambda: server.metric("onnxserve_inflight_requests", model="slow", version="1") == 0, timeout=30)
    assert (
        server.metric("onnxserve_requests_total", model="slow", version="1", outcome="cancelled")
        == before_cancelled + 4
    )
    assert server.metric("onnxserve_queue_depth", model="slow", version="1") == 0
    # The blocker's row may have run before the cancel reached it; the queued 6 rows never did.
    assert server.metric("onnxserve_inferences_total", model="slow", version="1") - before_rows <= 1
    x = caller_rows(9, 1)
    result = server.client().infer("slow", inputs(x, module=grpcclient, work=0))
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
