"""onnxserve-tune's search, as pure functions over recorded measurements (no server, no clock
but the one passed in): which configurations to try, which to drop, what a rate costs with
replicas, the Pareto front, the winner at each rate (the budget is budget.py).

Noise is part of every comparison: two figures differ only when they differ by more than the
larger of the points' measured noise and the tolerance, so a winner is never crowned inside it.
"""

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_ERROR_RATIO = 0.001  # a point with more failed requests than this does not meet the target
PROBE_STEP = 1.5  # rate probes go up (or down) by this factor
SECONDS_PER_MILLION = 1e6 / 3600  # $/h at 1 request/s -> $ per million requests is price x this


@dataclass(frozen=True)
class Candidate:
    """One configuration of the model: the server settings onnxserve-tune varies."""

    kind: str = "cpu"  # instance_group kind: cpu or gpu
    max_batch_size: int = 0  # 0: the model has no batch dimension, never batched
    queue_delay_us: int = 0  # dynamic_batching.max_queue_delay_microseconds; 0 = the adaptive delay
    instances: int = 1  # instance_group count
    threads: int = 0  # parameters intra_op_thread_count; 0 = chosen by measurement at load
    graph_level: int = 0  # Triton's optimization.graph.level: 0 all (default), 1 extended, -1 basic
    accelerator: str = ""  # on a GPU: "" (CUDA) or "tensorrt_fp16"

    @property
    def label(self) -> str:
        provider = {"": "cuda", "tensorrt_fp16": "trt-fp16"}[self.accelerator] if self.kind == "gpu" else "cpu"
        parts = [provider, f"b{self.max_batch_size}"]
        if self.max_batch_size > 1:
            parts.append(f"d{self.queue_delay_us}" if self.queue_delay_us else "d-auto")
        parts += [f"i{self.instances}", f"t{self.threads}" if self.threads else "t-auto"]
        if self.graph_level:
            parts.append({1: "g-ext", -1: "g-basic", 2: "g-off"}[self.graph_level])
        return " ".join(parts)


@dataclass(frozen=True)
class Space:
    """The values each dimension may take, the model's own included."""

    kinds: tuple[str, ...] = ("cpu",)
    max_batch_sizes: tuple[int, ...] = (0,)
    queue_delays_us: tuple[int, ...] = (0,)
    instances: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (0,)
    graph_levels: tuple[int, ...] = (0,)
    accelerators: tuple[str, ...] = ("",)
    cores: int = 1


DIMENSIONS = {  # Candidate field -> Space field, in the order refinement walks them
    "max_batch_size": "max_batch_sizes",
    "queue_delay_us": "queue_delays_us",
    "instances": "instances",
    "threads": "threads",
    "graph_level": "graph_levels",
    "accelerator": "accelerators",
}


def make_space(base: Candidate, batchable: bool, cores: int, gpu: bool, request_rows: int = 1) -> Space:
    """Spread-out values of each dimension, always with the model's own (`base`) among them.
    max_batch_size also caps the rows of one request: it never goes below `request_rows`, the most
    rows the model's clients send at once (nor below the model's own, if that is lower still)."""
    threads = [0] + [n for n in (1, 2, 4, 8, 16) if n <= cores]
    floor = min(request_rows, base.max_batch_size)
    return Space(
        kinds=tuple(sorted({base.kind, "gpu" if gpu else "cpu"})),
        max_batch_sizes=_with(base.max_batch_size, [n for n in (1, 8, 32, 64) if n >= floor] if batchable else (0,)),
        queue_delays_us=_with(base.queue_delay_us, (0, 500, 2000, 5000) if batchable else (0,)),
        instances=_with(base.instances, [n for n in (1, 2, 4) if n <= max(1, cores)]),
        threads=_with(base.threads, (0,) if gpu else threads),
        graph_levels=(-1, 0, 1) if base.graph_level in (-1, 0, 1) else (-1, 0, 1, base.graph_level),
        accelerators=("", "tensorrt_fp16") if gpu else ("",),
        cores=cores,
    )


def _with(value: int, values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({value, *values}))


def normalise(candidate: Candidate) -> Candidate:
    """The same configuration written one way: settings that cannot matter are at their default."""
    changes = {}
    if candidate.max_batch_size <= 1:
        changes["queue_delay_us"] = 0  # nothing to wait for
    if candidate.kind == "gpu":
        changes["threads"] = 0  # one per GPU instance, as the server chooses
    else:
        changes["accelerator"] = ""
    return dataclasses.replace(candidate, **changes)


def valid(candidate: Candidate, space: Space) -> bool:
    """Within the space, and no more intra-op threads than cores (oversubscription only slows)."""
    inside = all(getattr(candidate, name) in getattr(space, values) for name, values in DIMENSIONS.items())
    busy = candidate.instances * max(1, candidate.threads)
    return inside and candidate.kind in space.kinds and (candidate.kind == "gpu" or busy <= space.cores)


def coarse_candidates(base: Candidate, space: Space) -> list[Candidate]:
    """A few spread-out configurations, the most telling first (the budget may cut the tail):
    the model's own, no batching, big batches with a queue delay, two instances, one thread..."""
    top, batchable = max(space.max_batch_sizes), max(space.max_batch_sizes) > 0
    half = max(1, space.cores // 2)
    tries = [base]
    if "tensorrt_fp16" in space.accelerators:
        tries.append(dataclasses.replace(base, kind="gpu", accelerator="tensorrt_fp16"))
    if batchable:
        tries += [
            dataclasses.replace(base, max_batch_size=1),
            dataclasses.replace(base, max_batch_size=top, queue_delay_us=2000),
        ]
    tries += [dataclasses.replace(base, instances=2, threads=half if space.kinds == ("cpu",) else 0)]
    tries += [dataclasses.replace(base, threads=1)]
    if batchable:
        tries.append(dataclasses.replace(base, max_batch_size=8, queue_delay_us=500))
    tries.append(dataclasses.replace(base, graph_level=-1))
    return _distinct(tries, space)


def neighbours(candidate: Candidate, space: Space) -> list[Candidate]:
    """The configurations one step away along each dimension, in the order DIMENSIONS lists them."""
    found = []
    for field_name, space_field in DIMENSIONS.items():
        values = getattr(space, space_field)
        current = getattr(candidate, field_name)
        if current not in values:
            continue
        index = values.index(current)
        for step in (-1, 1):
            if 0 <= index + step < len(values):
                found.append(dataclasses.replace(candidate, **{field_name: values[index + step]}))
    return [c for c in _distinct(found, space) if c != normalise(candidate)]


def _distinct(candidates: Iterable[Candidate], space: Space) -> list[Candidate]:
    seen: dict[Candidate, None] = {}
    for candidate in candidates:
        candidate = normalise(candidate)
        if valid(candidate, space):
            seen.setdefault(candidate, None)
    return list(seen)


# --- measurements and what they say -----------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One configuration at one offered rate, as measured (client side unless named server_)."""

    config: str  # Candidate.label
    rate: float  # offered requests per second (one row each)
    p50_ms: float
    p99_ms: float
    throughput: float = 0.0  # answered inferences per second
    requests: int = 0
    errors: int = 0
    cost_per_million: float | None = None  # $ per 1M inferences on one replica, idle included
    busy_share: float | None = None  # the model's batches' share of the device cost
    joules_per_inference: float | None = None  # where the device's energy is measured
    noise: float = 0.0  # relative difference of the last two windows' p99s
    stable: bool = True  # two successive windows agreed within the tolerance
    price_per_hour: float = 0.0  # the devices the model ran on
    devices: tuple[str, ...] = ("cpu",)
    resources: int = 1  # instances x intra-op threads in force (the tie-break prefers fewer)
    changes: int = 0  # settings that differ from the model's own configuration
    server_p50_ms: float | None = None  # from onnxserve_request_duration_seconds' buckets
    server_p99_ms: float | None = None
    mean_batch: float | None = None
    windows: int = 0
    window_p99_ms: tuple[float, ...] = ()
    seconds: float = 0.0
    error_samples: tuple[str, ...] = ()


def margin(*points: Measurement, tolerance: float) -> float:
    """The relative difference below which these points cannot be told apart."""
    return max([tolerance, *(p.noise for p in points)])


def error_ratio(point: Measurement) -> float:
    return point.errors / point.requests if point.requests else 1.0


def meets(point: Measurement, p99_ms: float) -> bool:
    return point.p99_ms <= p99_ms and error_ratio(point) <= MAX_ERROR_RATIO


def clearly_fails(point: Measurement, p99_ms: float, tolerance: float) -> bool:
    """Fails beyond its noise: then it cannot meet the target at a higher rate either."""
    if error_ratio(point) > MAX_ERROR_RATIO:
        return True
    return point.p99_ms > p99_ms * (1 + margin(point, tolerance=tolerance))


def dominates(a: Measurement, b: Measurement, tolerance: float) -> bool:
    """a is no worse than b in cost and p99, and better in one, each beyond the noise."""
    slack = margin(a, b, tolerance=tolerance)
    cost_a, cost_b = a.cost_per_million or 0.0, b.cost_per_million or 0.0

    def better(x: float, y: float) -> bool:
        return x * (1 + slack) < y

    def not_worse(x: float, y: float) -> bool:
        return x <= y * (1 + slack)

    return (
        not_worse(cost_a, cost_b)
        and not_worse(a.p99_ms, b.p99_ms)
        and (better(cost_a, cost_b) or better(a.p99_ms, b.p99_ms))
    )


def pareto_front(points: Sequence[Measurement], tolerance: float) -> list[Measurement]:
    """The points at one rate that no other dominates on (cost, p99), cheapest first."""
    front = [p for p in points if not any(dominates(q, p, tolerance) for q in points if q is not p)]
    return sorted(front, key=lambda p: (p.cost_per_million or 0.0, p.p99_ms))


@dataclass(frozen=True)
class Capacity:
    """The highest rate a configuration was measured to sustain within the p99."""

    config: str
    rate: float | None  # None: it met the target at no rate measured
    failed_at: float | None  # the lowest rate above it that clearly failed; None: not found (a lower bound)


def capacity(points: Iterable[Measurement], p99_ms: float, tolerance: float) -> Capacity | None:
    """Rates in increasing order until the first clear failure; a rate met above a failure is noise."""
    ordered = sorted(points, key=lambda p: p.rate)
    if not ordered:
        return None
    best = None
    for point in ordered:
        if meets(point, p99_ms):
            best = point.rate
        elif clearly_fails(point, p99_ms, tolerance):
            return Capacity(ordered[0].config, best, point.rate)
    return Capacity(ordered[0].config, best, None)


def capacities(points: Iterable[Measurement], p99_ms: float, tolerance: float) -> dict[str, Capacity]:
    by_config: dict[str, list[Measurement]] = {}
    for point in points:
        by_config.setdefault(point.config, []).append(point)
    return {config: capacity(found, p99_ms, tolerance) for config, found in by_config.items()}


def replicas_needed(rate: float, sustained: float) -> int:
    """Servers of this configuration needed for `rate`, each given at most what one sustained."""
    return max(1, math.ceil(rate / sustained - 1e-9))


def cost_per_million(rate: float, replicas: int, price_per_hour: float) -> float:
    """$ per million inferences at `rate` a second: every replica's whole price, busy or idle."""
    return replicas * price_per_hour * SECONDS_PER_MILLION / rate


@dataclass(frozen=True)
class Choice:
    """The cheapest configuration for one rate, and how it was chosen."""

    rate: float
    config: str
    replicas: int
    cost_per_million: float  # with those replicas: replicas x price / rate
    measured: Measurement | None  # this configuration measured at this rate, one replica
    tied_with: tuple[str, ...]  # within the noise of the winner on cost
    reason: str


def robust(point: Measurement, p99_ms: float, tolerance: float) -> bool:
    """Meets the p99 with room for its noise: a point that meets it only just may not tomorrow."""
    return meets(point, p99_ms) and point.p99_ms * (1 + margin(point, tolerance=tolerance)) <= p99_ms


def tie_break(point: Measurement, p99_ms: float, tolerance: float) -> tuple:
    """Among configurations that cost the same within the noise: one meeting the p99 beyond its
    noise, then fewer cores busy (instances x threads), then fewer settings changed from the
    model's own, then the lower p99."""
    return (not robust(point, p99_ms, tolerance), point.resources, point.changes, point.p99_ms)


def choose(rate: float, points: Sequence[Measurement], p99_ms: float, tolerance: float) -> Choice | None:
    """The cheapest way to serve `rate` within the p99: configurations that met it at this rate on
    one replica, and those that met it at a lower rate served by enough replicas."""
    caps = capacities(points, p99_ms, tolerance)
    options = []  # (cost with replicas, replicas, representative point, point at this rate)
    for config, cap in caps.items():
        if cap is None or cap.rate is None:
            continue
        mine = [p for p in points if p.config == config]
        here = next((p for p in mine if p.rate == rate and meets(p, p99_ms)), None)
        sustained = rate if here is not None else min(cap.rate, rate)
        count = 1 if here is not None else replicas_needed(rate, sustained)
        anchor = here or max((p for p in mine if p.rate == cap.rate), key=lambda p: p.rate)
        options.append((cost_per_million(rate, count, anchor.price_per_hour), count, anchor, here))
    if not options:
        return None
    options.sort(key=lambda option: option[0])
    cheapest = options[0]
    tied = [o for o in options if o[1] == cheapest[1] and _same_cost(o, cheapest, tolerance)]
    winner = min(tied, key=lambda option: tie_break(option[2], p99_ms, tolerance))
    others = tuple(o[2].config for o in tied if o is not winner)
    reason = (
        "cheapest" if not others else f"tied on cost within the noise with {len(others)} other(s); " + TIE_BREAK_RULE
    )
    if winner[1] > 1:
        reason += f"; {winner[1]} replicas, each sustaining {winner[2].rate:g}/s within the p99"
    return Choice(rate, winner[2].config, winner[1], winner[0], winner[3], others, reason)


TIE_BREAK_RULE = "chosen by meeting the p99 beyond the noise, then fewer instances x threads, then fewer changed settings, then lower p99"


def _same_cost(a: tuple, b: tuple, tolerance: float) -> bool:
    slack = margin(a[2], b[2], tolerance=tolerance)
    return a[0] <= b[0] * (1 + slack) and b[0] <= a[0] * (1 + slack)


def closest(points: Sequence[Measurement], p99_ms: float) -> Measurement | None:
    """When nothing meets the target: the point nearest to it, at the lowest rate it was tried."""
    if not points:
        return None
    lowest = min(p.rate for p in points)
    return min((p for p in points if p.rate == lowest), key=lambda p: (error_ratio(p), p.p99_ms / p99_ms))


def survivors(points: Sequence[Measurement], rate: float, p99_ms: float, tolerance: float) -> set[str]:
    """Configurations worth refining or probing after `rate`: they met the p99 there and no
    other that met it dominates them (cost, p99) beyond the noise."""
    met = [p for p in points if p.rate == rate and meets(p, p99_ms)]
    return {p.config for p in pareto_front(met, tolerance)}


# --- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """The best a device did: its price and the highest rate one server sustained within the p99."""

    device: str
    price_per_hour: float
    sustained: float
    config: str


def break_even(offers: Sequence[Offer], up_to: float) -> list[tuple[float, str]]:
    """[(from rate, cheapest device)] over 0 < rate <= up_to, each device priced with the replicas
    it needs (ceil(rate / sustained) x price): where the cheaper device changes."""
    if len(offers) < 2:
        return []
    edges = sorted({k * o.sustained for o in offers for k in range(1, int(up_to / o.sustained) + 2)} | {up_to})
    changes: list[tuple[float, str]] = []
    lower = 0.0
    for edge in edges:
        if edge > up_to * 1.000001 or edge <= lower:
            continue
        probe = (lower + edge) / 2  # the cheapest device is constant between two edges
        best = min(offers, key=lambda o: (replicas_needed(probe, o.sustained) * o.price_per_hour, o.device))
        if not changes or changes[-1][1] != best.device:
            changes.append((round(lower, 3), best.device))
        lower = edge
    return changes
