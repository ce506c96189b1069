"""Measuring one (configuration, rate) point for onnxserve-tune: a warm-up, then windows of
open-loop Poisson load, repeated until two successive windows' p99s agree (or marked noisy);
cost, energy, batch size and server-side latency from the server's own /metrics, read before
and after each window, so the figures are the ones users will see in production."""

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from server.tools.loadgen import Run
from server.tools.metrics_reader import Samples, read_samples
from server.tune.budget import Budget, MeasurePlan
from server.tune.search import Measurement


@dataclass(frozen=True)
class Price:
    device: str
    dollars_per_hour: float
    source: str  # the server's label: flag, env, default, table, unknown, included
    energy_measured: bool


def prices(samples: Samples) -> dict[str, Price]:
    """Each device's price as the server states it on /metrics."""
    found = {}
    for labels, value in samples.series("onnxserve_device_price_dollars_per_hour"):
        device = labels["device"]
        energy = samples.label_values("onnxserve_device_info", "energy", device=device)
        found[device] = Price(device, value, labels.get("source", ""), energy == {"nvml"})
    return found


def model_devices(samples: Samples, model: str) -> tuple[str, ...]:
    """The devices the model's batches are charged to (its cost series exist from its load on)."""
    return tuple(sorted(samples.label_values("onnxserve_cost_dollars_total", "device", model=model)))


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) buckets: linear
    within the bucket that holds the quantile. Bucket bounds are 2.5x apart: a rough figure."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # beyond the last finite bucket: its bound, as Prometheus answers
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Ledger:
    """What the server's counters moved by over the windows of one point, for one model."""

    model_cost: float = 0.0
    idle_cost: float = 0.0
    inferences: float = 0.0
    energy: float = 0.0
    batches: float = 0.0
    batch_rows: float = 0.0
    duration_buckets: dict[float, float] = field(default_factory=dict)

    def add(self, before: Samples, after: Samples, model: str, devices: tuple[str, ...]) -> None:
        def delta(name: str, **labels: str) -> float:
            return after.change_since(before, name, **labels)

        self.model_cost += delta("onnxserve_cost_dollars_total", model=model)
        self.idle_cost += sum(delta("onnxserve_idle_cost_dollars_total", device=d) for d in devices)
        self.inferences += delta("onnxserve_inferences_total", model=model)
        self.energy += delta("onnxserve_energy_joules_total", model=model)
        self.energy += sum(delta("onnxserve_idle_energy_joules_total", device=d) for d in devices)
        self.batches += delta("onnxserve_batch_size_count", model=model)
        self.batch_rows += delta("onnxserve_batch_size_sum", model=model)
        for bound in after.label_values("onnxserve_request_duration_seconds_bucket", "le", model=model):
            moved = delta("onnxserve_request_duration_seconds_bucket", model=model, le=bound)
            self.duration_buckets[float(bound)] = self.duration_buckets.get(float(bound), 0.0) + moved

    def server_ms(self, q: float) -> float | None:
        value = bucket_quantile(list(self.duration_buckets.items()), q)
        return None if value is None else value * 1e3


@dataclass
class Window:
    latencies: list[float]
    errors: list[str]
    seconds: float

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(np.array(self.latencies) * 1e3, 99)) if self.latencies else float("inf")


@dataclass(frozen=True)
class Target:
    """Where the load and the scrapes go, and the model they are about."""

    channel: grpc.aio.Channel
    metrics_url: str
    model: str
    payload: bytes  # one serialized ModelInferRequest of one row
    rows: int = 1


async def _window(target: Target, rate: float, seconds: float, seed: int) -> Window:
    run = Run("", target.payload, time.monotonic() + seconds, 0, False, channel=target.channel)
    began = time.perf_counter()
    await run.open_loop(rate, "poisson", seed)
    return Window(run.latencies, run.errors, time.perf_counter() - began)


def agree(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * min(a, b)


async def measure(
    target: Target, config: str, rate: float, plan: MeasurePlan, budget: Budget, facts: dict, seed: int
) -> Measurement:
    """One point: warm-up, then windows until two in a row agree on the p99 within the plan's
    tolerance, or max_windows, or the budget ends; unstable points are marked so, not hidden.
    `facts`: resources, changes (see Measurement)."""
    began = time.perf_counter()
    await _window(target, rate, plan.warmup_s, seed)  # same load, thrown away: pools, caches, batch sizes settle
    window_s = plan.window_s(rate)
    windows: list[Window] = []
    ledger, devices, stable = Ledger(), (), False
    while len(windows) < plan.max_windows:
        if len(windows) >= plan.min_windows and not budget.fits(window_s + plan.overhead_s):
            break
        before = await asyncio.to_thread(read_samples, target.metrics_url)
        windows.append(await _window(target, rate, window_s, seed + len(windows) + 1))
        after = await asyncio.to_thread(read_samples, target.metrics_url)
        devices = model_devices(after, target.model)
        ledger.add(before, after, target.model, devices)
        if len(windows) >= plan.min_windows and agree(windows[-1].p99_ms, windows[-2].p99_ms, plan.tolerance):
            stable = True
            break
    return _point(
        target, config, rate, windows, ledger, devices, prices(after), stable, facts, time.perf_counter() - began
    )


def _point(target, config, rate, windows, ledger, devices, priced, stable, facts, seconds) -> Measurement:
    latencies = np.array([x for w in windows for x in w.latencies]) * 1e3
    errors = [e for w in windows for e in w.errors]
    p99s = tuple(round(w.p99_ms, 3) for w in windows)
    noise = abs(p99s[-1] - p99s[-2]) / min(p99s[-1], p99s[-2]) if len(p99s) >= 2 and min(p99s[-2:]) > 0 else 1.0
    total_cost = ledger.model_cost + ledger.idle_cost
    energy_measured = bool(devices) and all(priced[d].energy_measured for d in devices if d in priced)
    return Measurement(
        config=config,
        rate=rate,
        p50_ms=float(np.percentile(latencies, 50)) if latencies.size else float("inf"),
        p99_ms=float(np.percentile(latencies, 99)) if latencies.size else float("inf"),
        throughput=latencies.size * target.rows / sum(w.seconds for w in windows),
        requests=latencies.size + len(errors),
        errors=len(errors),
        cost_per_million=total_cost / ledger.inferences * 1e6 if ledger.inferences else None,
        busy_share=ledger.model_cost / total_cost if total_cost else None,
        joules_per_inference=ledger.energy / ledger.inferences if energy_measured and ledger.inferences else None,
        noise=round(noise, 4),
        stable=stable,
        price_per_hour=sum(priced[d].dollars_per_hour for d in devices if d in priced),
        devices=devices,
        resources=facts.get("resources", 1),
        changes=facts.get("changes", 0),
        server_p50_ms=ledger.server_ms(0.5),
        server_p99_ms=ledger.server_ms(0.99),
        mean_batch=ledger.batch_rows / ledger.batches if ledger.batches else None,
        windows=len(windows),
        window_p99_ms=p99s,
        seconds=round(seconds, 2),
        error_samples=tuple(sorted(set(errors))[:3]),
    )
