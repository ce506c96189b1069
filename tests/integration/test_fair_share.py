"""Fair share under overload, as bench/fair_share.py measures it but with generous bounds: tenant A
floods a model whose batches take a fixed time, tenant B sends one request at a time, and B's
requests ride the next batch instead of waiting behind A's queue; none of B's is refused."""

import asyncio
import statistics
import time

import pytest
import tritonclient.grpc.aio as aioclient

from tests import onnx_models
from tests.integration.test_batching import caller_rows, inputs

# A batch of the slow model runs `work` rounds whatever its rows (tens of ms here), so A's 48 callers
# queue a dozen batches deep while B, fairly served, waits for one or two.
WORK, BATCH, FLOODERS, LIGHT_REQUESTS = 80, 4, 48, 12
CONFIG = f"max_batch_size: {BATCH}\ndynamic_batching {{ max_queue_delay_microseconds: 0 }}"


async def timed(client, tenant: str, caller: int, latencies: list[float]) -> None:
    started = time.perf_counter()
    await client.infer("slow", inputs(caller_rows(caller, 1), work=WORK), headers={"x-tenant-id": tenant})
    latencies.append(time.perf_counter() - started)


async def flood_and_probe(url: str) -> tuple[list[float], list[float]]:
    flooder, prober = aioclient.InferenceServerClient(url), aioclient.InferenceServerClient(url)
    flood_latencies: list[float] = []
    light_latencies: list[float] = []
    stop = asyncio.Event()

    async def flood(caller: int) -> None:
        while not stop.is_set():
            await timed(flooder, "a", caller, flood_latencies)

    flooding = [asyncio.create_task(flood(caller)) for caller in range(FLOODERS)]
    try:
        await asyncio.sleep(1.0)  # A's queue fills
        for request in range(LIGHT_REQUESTS):
            await timed(prober, "b", 1000 + request, light_latencies)
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*flooding)
        await flooder.close()
        await prober.close()
    return flood_latencies, light_latencies


@pytest.mark.parametrize("frontends", ["1", "2"])  # the tenant crosses the link to the engine's batcher
def test_a_light_tenant_rides_the_next_batch_while_another_floods(tmp_path, serve, frontends):
    repository = tmp_path / "models"
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), CONFIG)
    server = serve(repository, "--trust-tenant-header", "--frontends", frontends)
    flood_latencies, light_latencies = asyncio.run(flood_and_probe(server.url))
    assert len(light_latencies) == LIGHT_REQUESTS  # every one of B's answered: none refused
    flooded, light = statistics.median(flood_latencies), statistics.median(light_latencies)
    # Served in arrival order, B would wait as long as A (about FLOODERS / BATCH batches); fairly, a
    # batch or two. A third of A's wait is a bound that CI's noise cannot reach either way.
    assert light < flooded / 3, f"B's median {light * 1e3:.0f} ms against A's {flooded * 1e3:.0f} ms"
    assert (
        server.metric("onnxserve_tenant_requests_total", tenant="b", model="slow", version="1", outcome="ok")
        == LIGHT_REQUESTS
    )
