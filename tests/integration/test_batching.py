"""Dynamic batching through the real server: own rows for every caller, shapes kept
apart, queue limits, timeouts, cancellation and priority."""

import asyncio
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from tests import onnx_models
from tests.conftest import start_server

# Rounds of the slow model's loop: enough to keep an instance busy for about a second.
BLOCKING_WORK = 12000
SLOW_CONFIG = """
max_batch_size: 8
dynamic_batching {{
  max_queue_delay_microseconds: 0
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {{ max_queue_size: {queue} allow_timeout_override: true }}
}}
"""
# Long enough a delay that concurrent callers share batches.
ADD_ONE_CONFIG = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 20000 }"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "add_one", onnx_models.add_one(), ADD_ONE_CONFIG)
    onnx_models.write(
        repository,
        "ragged",
        onnx_models.add_one(shape=("batch", "width")),
        "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 50000 }",
    )
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), SLOW_CONFIG.format(queue=3))
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def inputs(x: np.ndarray, module=aioclient, work: int | None = None):
    tensors = [module.InferInput("x", list(x.shape), "FP32")]
    tensors[0].set_data_from_numpy(x)
    if work is not None:
        rounds = np.full((x.shape[0], 1), work, dtype=np.int64)
        tensors.append(module.InferInput("work", list(rounds.shape), "INT64"))
        tensors[1].set_data_from_numpy(rounds)
    return tensors


def caller_rows(caller: int, rows: int, width: int = 4) -> np.ndarray:
    """Values unique to one caller, so a mixed-up row cannot pass."""
    return (caller * 1000 + np.arange(rows * width, dtype=np.float32)).reshape(rows, width)


async def with_client(url: str, body):
    client = aioclient.InferenceServerClient(url)
    try:
        return await body(client)
    finally:
        await client.close()


def test_hundred_concurrent_callers_each_get_their_own_rows(server):
    before_rows = server.metric("onnxserve_inferences_total", model="add_one", version="1")
    before_batches = server.metric("onnxserve_batches_total", model="add_one", version="1")
    sizes = [1 + (caller % 4) for caller in range(100)]

    async def body(client):
        async def one(caller: int):
            x = caller_rows(caller, sizes[caller])
            result = await client.infer("add_one", inputs(x), request_id=str(caller))
            return caller, x, result

        return await asyncio.gather(*(one(caller) for caller in range(100)))

    for caller, x, result in asyncio.run(with_client(server.url, body)):
        assert result.get_response().id == str(caller)
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    rows = server.metric("onnxserve_inferences_total", model="add_one", version="1") - before_rows
    batches = server.metric("onnxserve_batches_total", model="add_one", version="1") - before_batches
    assert rows == sum(sizes)
    assert batches < 100, "requests should have been batched together"
    assert rows / batches > 1


def test_different_shapes_are_never_concatenated(server):
    widths = [2, 3, 5]

    async def body(client):
        async def one(caller: int):
            x = caller_rows(caller, 1 + caller % 3, width=widths[caller % 3])
            return x, await client.infer("ragged", inputs(x))

        return await asyncio.gather(*(one(caller) for caller in range(30)))

    for x, result in asyncio.run(with_client(server.url, body)):
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)


def block_slow_model(client, work=BLOCKING_WORK):
    """Start a request that keeps the slow model's only instance busy."""
    return asyncio.create_task(client.infer("slow", inputs(caller_rows(0, 1), work=work)))


def test_full_queue_refuses_at_once_with_unavailable(server):
    async def body(client):
        blocker = block_slow_model(client)
        await asyncio.sleep(0.2)
        queued = [asyncio.create_task(client.infer("slow", inputs(caller_rows(i, 1), work=0))) for i in range(1, 4)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(grpcclient.InferenceServerException) as error:
            await client.infer("slow", inputs(caller_rows(9, 1), work=0))
        refused_after = time.monotonic() - started
        results = await asyncio.gather(blocker, *queued)
        return error.value, refused_after, results

    error, refused_after, results = asyncio.run(with_client(server.url, body))
    assert "UNAVAILABLE" in error.status()
    assert "queue is full" in error.message() and "'slow'" in error.message()
    assert refused_after < 0.5, "a full queue must refuse without waiting"
    for caller, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("y"), caller_rows(caller, 1) + 1)


def test_request_timeout_in_queue_is_deadline_exceeded_and_never_runs(server):
    before = server.metric("onnxserve_inferences_total", model="slow", version="1")

    async def body(client):
        blocker = block_slow_model(client)
        await asyncio.sleep(0.2)
        with pytest.raises(grpcclient.InferenceServerException) as error:
            await client.infer("slow", inputs(caller_rows(5, 2), work=0), timeout=100_000)  # microseconds
        await blocker
        return error.value

    error = asyncio.run(with_client(server.url, body))
    assert "DEADLINE_EXCEEDED" in error.status()
    assert "'slow'" in error.message() and "timed out" in error.message()
    assert server.metric("onnxserve_inferences_total", model="slow", version="1") == before + 1  # the blocker only
    assert server.metric("onnxserve_requests_total", model="slow", version="1", outcome="timeout") >= 1


def test_cancelled_caller_is_dropped_and_others_are_answered(server):
    before = server.metric("onnxserve_inferences_total", model="slow", version="1")

    async def body(client):
        blocker = block_slow_model(client)
        await asyncio.sleep(0.2)
        doomed = asyncio.create_task(client.infer("slow", inputs(caller_rows(7, 3), work=0), client_timeout=0.2))
        survivor = asyncio.create_task(client.infer("slow", inputs(caller_rows(8, 1), work=0)))
        with pytest.raises(grpcclient.InferenceServerException) as error:
            await doomed
        return error.value, await blocker, await survivor

    error, blocked, survivor = asyncio.run(with_client(server.url, body))
    assert "DEADLINE_EXCEEDED" in error.status()
    np.testing.assert_array_equal(blocked.as_numpy("y"), caller_rows(0, 1) + 1)
    np.testing.assert_array_equal(survivor.as_numpy("y"), caller_rows(8, 1) + 1)
    # the blocker's row and the survivor's row ran; the cancelled caller's 3 rows never did
    assert server.metric("onnxserve_inferences_total", model="slow", version="1") == before + 2
    assert server.metric("onnxserve_requests_total", model="slow", version="1", outcome="cancelled") >= 1


def test_higher_priority_runs_first(server):
    async def body(client):
        order = []

        async def tracked(name: str, priority: int, rows: int, work: int):
            x = caller_rows(rows, rows)
            result = await client.infer("slow", inputs(x, work=work), priority=priority)
            order.append(name)
            np.testing.assert_array_equal(result.as_numpy("y"), x + 1)

        blocker = block_slow_model(client)
        await asyncio.sleep(0.2)
        # 8 + 1 rows exceed max_batch_size 8, so the two cannot share a batch: one must go first.
        low = asyncio.create_task(tracked("low", 2, rows=8, work=BLOCKING_WORK // 5))
        await asyncio.sleep(0.05)
        high = asyncio.create_task(tracked("high", 1, rows=1, work=0))
        await asyncio.gather(blocker, low, high)
        return order

    assert asyncio.run(with_client(server.url, body)) == ["high", "low"]


def test_priority_outside_levels_is_invalid(server):
    with pytest.raises(grpcclient.InferenceServerException) as error:
        server.client().infer("slow", inputs(caller_rows(1, 1), module=grpcclient, work=0), priority=3)
    assert "INVALID_ARGUMENT" in error.value.status()
    assert "priority 3" in error.value.message()
