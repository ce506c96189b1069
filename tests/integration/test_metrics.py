"""/metrics, per-request cost parameters and ModelStatistics, checked against what
the test itself sent and measured."""

import asyncio
import shutil
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server import protocol
from tests import onnx_models
from tests.conftest import start_server
from tests.integration.test_batching import caller_rows, inputs, with_client

PRICE_PER_HOUR = 36.0  # one cent per second
SLOW_CONFIG = """
max_batch_size: 8
dynamic_batching {
  max_queue_delay_microseconds: 0
  default_queue_policy { max_queue_size: 3 allow_timeout_override: true }
}
"""
BLOCKING_WORK = 12000  # about a second of the slow model's loop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    batching = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 2000 }"
    onnx_models.write(repository, "fast", onnx_models.add_one(), batching)
    onnx_models.write(repository, "other", onnx_models.add_one(), batching)
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), SLOW_CONFIG)
    running = start_server(repository, "--device-price", f"cpu={PRICE_PER_HOUR}")
    yield running
    assert running.stop() == 0


def delta(after, before, name, **labels):
    return after.get(name, **labels) - before.get(name, **labels)


def infer_many(url: str, model: str, row_counts: list[int], concurrency: int = 8):
    """Concurrent callers; returns (rows sent, result, client-side seconds) per request."""

    async def body(client):
        gate = asyncio.Semaphore(concurrency)

        async def one(caller: int, rows: int):
            async with gate:
                x = caller_rows(caller, rows)
                started = time.perf_counter()
                result = await client.infer(model, inputs(x))
                elapsed = time.perf_counter() - started
                np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
                return rows, result, elapsed

        return await asyncio.gather(*(one(caller, rows) for caller, rows in enumerate(row_counts)))

    return asyncio.run(with_client(url, body))


def parameter(result, name: str):
    found = result.get_response().parameters[name]
    return getattr(found, found.WhichOneof("parameter_choice"))


# --- counters and histograms ----------------------------------------------------------------


def send_every_outcome_to_slow(url: str) -> dict:
    """One instance busy for about a second, then: ok, timeout, cancelled and rejected."""

    async def body(client):
        def call(caller: int, **options):
            return asyncio.create_task(client.infer("slow", inputs(caller_rows(caller, 1), work=0), **options))

        blocker = asyncio.create_task(client.infer("slow", inputs(caller_rows(0, 1), work=BLOCKING_WORK)))
        await asyncio.sleep(0.2)
        ok, timed_out, cancelled = call(1), call(2, timeout=300_000), call(3, client_timeout=0.6)
        await asyncio.sleep(0.1)
        rejected = call(4)  # the queue holds 3
        results = await asyncio.gather(blocker, ok, timed_out, cancelled, rejected, return_exceptions=True)
        return dict(zip(("blocker", "ok", "timeout", "cancelled", "rejected"), results))

    return asyncio.run(with_client(url, body))


def test_counters_and_histograms_move_by_exactly_what_was_sent(server):
    before = server.samples()
    rows = [1 + caller % 3 for caller in range(12)]
    answered = infer_many(server.url, "fast", rows)
    client = server.client()
    for _ in range(3):
        with pytest.raises(grpcclient.InferenceServerException, match="INVALID_ARGUMENT"):
            client.infer("fast", inputs(np.zeros((1, 5), np.float32), module=grpcclient))
    slow = send_every_outcome_to_slow(server.url)
    after = server.samples()

    assert not isinstance(slow["blocker"], Exception) and not isinstance(slow["ok"], Exception)
    assert "DEADLINE_EXCEEDED" in slow["timeout"].status() and "timed out" in slow["timeout"].message()
    assert "DEADLINE_EXCEEDED" in slow["cancelled"].status()
    assert "UNAVAILABLE" in slow["rejected"].status()

    fast, slow_labels = {"model": "fast", "version": "1"}, {"model": "slow", "version": "1"}
    expected_outcomes = [
        (fast, "ok", 12),
        (fast, "invalid", 3),
        (slow_labels, "ok", 2),
        (slow_labels, "timeout", 1),
        (slow_labels, "cancelled", 1),
        (slow_labels, "rejected", 1),
    ]
    for labels, outcome, count in expected_outcomes:
        assert delta(after, before, "onnxserve_requests_total", **labels, outcome=outcome) == count, (labels, outcome)
    assert delta(after, before, "onnxserve_requests_total", **fast, outcome="error") == 0

    for labels, sent_rows, executed in ((fast, sum(rows), 12), (slow_labels, 2, 2)):
        batches = delta(after, before, "onnxserve_batches_total", **labels)
        assert delta(after, before, "onnxserve_inferences_total", **labels) == sent_rows
        assert delta(after, before, "onnxserve_batch_size_sum", **labels) == sent_rows
        assert delta(after, before, "onnxserve_batch_size_count", **labels) == batches
        for phase in ("input", "infer", "output"):
            assert delta(after, before, "onnxserve_compute_duration_seconds_count", **labels, phase=phase) == batches
        # Requests that ran waited in the queue; the timed-out and cancelled ones never ran.
        assert delta(after, before, "onnxserve_queue_duration_seconds_count", **labels) == executed
        assert delta(after, before, "onnxserve_request_duration_seconds_count", **labels) == executed
        assert delta(after, before, "onnxserve_request_duration_seconds_bucket", **labels, le="+Inf") == executed

    # Server-side durations sit inside what the client measured, and contain queue + compute.
    server_seconds = delta(after, before, "onnxserve_request_duration_seconds_sum", **fast)
    assert server_seconds <= sum(elapsed for _, _, elapsed in answered)
    inner = sum(parameter(r, "onnxserve_queue_us") + parameter(r, "onnxserve_compute_us") for _, r, _ in answered) / 1e6
    assert inner <= server_seconds + 12e-6
    # Buckets resolve a one-second execution: the blocker's infer phase is above 0.5 s.
    infer_buckets = {
        le: delta(after, before, "onnxserve_compute_duration_seconds_bucket", **slow_labels, phase="infer", le=le)
        for le in ("0.5", "+Inf")
    }
    assert infer_buckets["0.5"] < infer_buckets["+Inf"]


def test_queue_depth_and_inflight_gauges_count_what_is_waiting_and_running(server):
    async def body(client):
        blocker = asyncio.create_task(client.infer("slow", inputs(caller_rows(0, 1), work=BLOCKING_WORK)))
        await asyncio.sleep(0.2)
        queued = [asyncio.create_task(client.infer("slow", inputs(caller_rows(i, 1), work=0))) for i in (1, 2)]
        await asyncio.sleep(0.2)
        during = await asyncio.to_thread(server.samples)
        await asyncio.gather(blocker, *queued)
        return during

    during = asyncio.run(with_client(server.url, body))
    after = server.samples()
    slow = {"model": "slow", "version": "1"}
    assert during.get("onnxserve_inflight_requests", **slow) == 3  # one running, two waiting
    assert during.get("onnxserve_queue_depth", **slow) == 2
    assert after.get("onnxserve_inflight_requests", **slow) == 0
    assert after.get("onnxserve_queue_depth", **slow) == 0


# --- cost ---------------------------------------------------------------------------------------


def cost_accounts(samples) -> tuple[float, float, float, float]:
    """Sum of model costs, idle cost, price x device time, and the sum of batch times x price."""
    models = samples.total("onnxserve_cost_dollars_total", device="cpu")
    idle = samples.get("onnxserve_idle_cost_dollars_total", device="cpu")
    priced = samples.get("onnxserve_device_seconds_total", device="cpu") * PRICE_PER_HOUR / 3600
    busy = samples.total("onnxserve_compute_duration_seconds_sum") * PRICE_PER_HOUR / 3600
    return models, idle, priced, busy


def load_in_threads(url: str, plan: list[tuple[str, int]], seconds: float) -> int:
    """Each (model, work) pair is a thread calling in a loop for `seconds`; returns requests answered."""
    done, stop = [], time.monotonic() + seconds

    def caller(model: str, work: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        while time.monotonic() < stop:
            x = caller_rows(1, 2)
            tensors = inputs(x, module=grpcclient, work=work if model == "slow" else None)
            np.testing.assert_array_equal(client.infer(model, tensors).as_numpy("y"), x + 1)
            done.append(model)
        client.close()

    threads = [threading.Thread(target=caller, args=pair) for pair in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(done)


def test_cost_is_conserved_under_concurrent_load_with_idle_gaps(server):
    # Alone and one at a time, a model is charged exactly its batches' time.
    before = server.samples()
    infer_many(server.url, "other", [1] * 30, concurrency=1)
    after = server.samples()
    charged = delta(after, before, "onnxserve_cost_dollars_total", model="other", version="1", device="cpu")
    batch_seconds = delta(
        after, before, "onnxserve_compute_duration_seconds_sum", model="other", version="1", phase="infer"
    )
    batch_seconds += delta(
        after, before, "onnxserve_compute_duration_seconds_sum", model="other", version="1", phase="input"
    )
    batch_seconds += delta(
        after, before, "onnxserve_compute_duration_seconds_sum", model="other", version="1", phase="output"
    )
    assert charged == pytest.approx(batch_seconds * PRICE_PER_HOUR / 3600, rel=0.01)

    # Three models at once, with idle gaps between bursts.
    plan = [("fast", 0), ("fast", 0), ("other", 0), ("slow", 50), ("slow", 50)]
    answered = 0
    for _ in range(2):
        answered += load_in_threads(server.url, plan, seconds=0.8)
        time.sleep(0.4)
    assert answered > 20
    samples = server.samples()
    models, idle, priced, busy = cost_accounts(samples)
    assert models + idle == pytest.approx(priced, rel=0.01)
    assert idle > 0.4 * PRICE_PER_HOUR / 3600  # the gaps were idle
    assert all(
        samples.get("onnxserve_cost_dollars_total", model=m, version="1", device="cpu") > 0
        for m in ("fast", "other", "slow")
    )
    # Overlapping batches share the device, so models together cost at most their batch time.
    assert models <= busy * 1.000001
    uptime = samples.get("onnxserve_device_seconds_total", device="cpu")
    assert 0 < uptime <= time.time() - samples.get("process_start_time_seconds") + 1


def test_response_cost_parameters_add_up_to_the_cost_counter(server):
    before = server.samples()
    answered = infer_many(server.url, "fast", [1 + caller % 4 for caller in range(40)], concurrency=16)
    answered += infer_many(server.url, "other", [2] * 20, concurrency=4)
    after = server.samples()
    for model in ("fast", "other"):
        results = [(rows, r) for rows, r, _ in answered if r.get_response().model_name == model]
        reported = sum(parameter(r, "onnxserve_cost_dollars") for _, r in results)
        counted = delta(after, before, "onnxserve_cost_dollars_total", model=model, version="1", device="cpu")
        assert reported == pytest.approx(counted, rel=1e-6)
        for rows, result in results:
            assert parameter(result, "onnxserve_device") == "cpu"
            assert parameter(result, "onnxserve_batch_rows") >= rows
            assert parameter(result, "onnxserve_queue_us") >= 0 and parameter(result, "onnxserve_compute_us") > 0
            assert "onnxserve_energy_joules" not in result.get_response().parameters  # not measured on CPU
    # A request's share follows its rows: within one batch, cost per row is the same.
    by_batch = {}
    for rows, result, _ in answered:
        batch = by_batch.setdefault(parameter(result, "onnxserve_batch_id"), [])
        batch.append(
            (rows, parameter(result, "onnxserve_batch_rows"), parameter(result, "onnxserve_cost_dollars") / rows)
        )
    assert any(len(members) > 1 for members in by_batch.values()), "some requests should have shared a batch"
    for members in by_batch.values():
        assert sum(rows for rows, _, _ in members) == members[0][1]  # the batch's rows are its requests' rows
        per_row = [cost for _, _, cost in members]
        assert max(per_row) == pytest.approx(min(per_row), rel=1e-9)


def test_prices_and_cpu_fallback_are_labelled(server):
    samples = server.samples()
    assert samples.get("onnxserve_device_price_dollars_per_hour", device="cpu", source="flag") == PRICE_PER_HOUR
    assert not any(name.startswith("onnxserve_gpu_") for name in samples.names()), "no GPU, so no GPU series"
    assert not any(name.startswith("onnxserve_energy_joules") for name in samples.names())
    assert samples.get("onnxserve_device_info", device="cpu", energy="none") == 1  # energy is not measured here
    assert "no onnxserve_gpu_* series" in server.log_text()
    assert "cpu $36/h (flag)" in server.log_text()


def test_metrics_pass_promtool_check_metrics(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    infer_many(server.url, "fast", [1, 2])
    checked = subprocess.run([promtool, "check", "metrics"], input=server.metrics(), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- ModelStatistics ------------------------------------------------------------------------------


def statistics(url: str, name: str = "", version: str = ""):
    """ModelStatistics through our own message classes, which know the cost field."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            f"/{protocol.SERVICE_NAME}/ModelStatistics",
            request_serializer=protocol.request_class("ModelStatistics").SerializeToString,
            response_deserializer=protocol.ModelStatisticsResponse.FromString,
        )
        return call(protocol.request_class("ModelStatistics")(name=name, version=version), timeout=10)


def test_model_statistics_agree_with_the_metrics(server):
    infer_many(server.url, "fast", [3, 1, 2, 4])
    samples = server.samples()
    stats = server.client().get_inference_statistics("fast").model_stats[0]  # tritonclient's view
    fast = {"model": "fast", "version": "1"}
    assert (stats.name, stats.version) == ("fast", "1")
    assert stats.inference_count == samples.get("onnxserve_inferences_total", **fast)
    assert stats.execution_count == samples.get("onnxserve_batches_total", **fast)
    assert stats.inference_stats.success.count == samples.get("onnxserve_requests_total", **fast, outcome="ok")
    failed = samples.total("onnxserve_requests_total", **fast) - stats.inference_stats.success.count
    assert stats.inference_stats.fail.count == failed
    assert stats.inference_stats.queue.count == samples.get("onnxserve_queue_duration_seconds_count", **fast)
    assert stats.inference_stats.success.ns == pytest.approx(
        samples.get("onnxserve_request_duration_seconds_sum", **fast) * 1e9, rel=1e-3
    )
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == stats.inference_count
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert abs(stats.last_inference / 1000 - time.time()) < 60

    ours = statistics(server.url, "fast").model_stats[0]
    (cost,) = ours.onnxserve_cost
    assert cost.device == "cpu" and not cost.energy_measured
    assert cost.dollars == pytest.approx(samples.get("onnxserve_cost_dollars_total", **fast, device="cpu"), rel=1e-9)
    assert cost.dollars_per_inference == pytest.approx(cost.dollars / stats.inference_count)

    everything = statistics(server.url)
    assert [s.name for s in everything.model_stats] == ["fast", "other", "slow"]
    with pytest.raises(grpc.RpcError) as error:
        statistics(server.url, "missing")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "missing" in error.value.details()
