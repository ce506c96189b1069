"""Per-model defaults chosen by measurement at load: intra-op threads, whether onnxruntime's
thread pool may spin, and whether batches run on the event loop or in the instance's thread.

Users judge a server with their own model and no tuning, so a setting that config.pbtxt does not
fix is measured here, within a time budget, on the machine that will serve. Every decision is a
pure function of the timings, so it can be tested with a stand-in clock.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BUDGET_SECONDS = 2.0  # per model version, all trials together
RUNS_PER_TRIAL = 12  # timed runs per (threads, batch) trial, fewer when the budget runs short
LARGER_BATCH = 8  # the batch measured beside batch 1, capped by max_batch_size
HEAVY_RUN_SECONDS = 0.01  # a batch-1 run this long says all a larger batch would: it is not timed
MORE_THREADS_GAIN = 0.15  # another intra-op thread must make runs this much faster to be worth its core
MORE_THREADS_MIN_SECONDS = 50e-6  # ... and by at least this much: a tiny model's microseconds are noise
SPIN_GAIN = 0.10  # spinning must make runs this much faster to be worth the CPU it burns
HANDOFF_TRIALS = 30
# Longest a batch may hold the event loop: one measured above it sends the model back to its thread.
INLINE_STALL_LIMIT_US = 500

Run = Callable[[int], object]  # run(batch): one inference of that many rows, blocking
OpenRun = Callable[[int, bool], Run]  # open_run(intra_op_threads, allow_spinning) -> run


SETTINGS = ("intra_op_thread_count", "allow_spinning", "inline_run_below_us")  # config.pbtxt parameter names


@dataclass(frozen=True)
class Choice:
    """What the model runs with, and where each value came from."""

    intra_op_threads: int
    allow_spinning: bool
    inline_run_below_us: int  # 0: batches run in the instance's thread
    sources: dict[str, str] = field(default_factory=dict)  # setting -> "measured", "configured" or why
    timings: tuple[tuple[int, bool, int, float], ...] = ()  # (threads, spinning, batch, median seconds)
    handoff_us: float | None = None
    run_seconds: float | None = None  # a batch with the chosen settings, as calibration timed it
    note: str = ""  # why calibration fell back, when it did

    @property
    def measured(self) -> tuple[str, ...]:
        return tuple(name for name in SETTINGS if self.sources.get(name) == "measured")

    def describe(self) -> str:
        values = (self.intra_op_threads, int(self.allow_spinning), self.inline_run_below_us)
        settings = ", ".join(
            f"{name} {value} ({self.sources.get(name, 'configured')})" for name, value in zip(SETTINGS, values)
        )
        runs = ", ".join(
            f"{t} thread(s){' spinning' if s else ''} batch {b}: {sec * 1e6:.0f} us" for t, s, b, sec in self.timings
        )
        handoff = f"; thread handoff {self.handoff_us:.0f} us" if self.handoff_us is not None else ""
        return settings + (f" [{runs}{handoff}]" if runs else "") + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Fixed:
    """Values that are not measured: set by config.pbtxt, or by a rule whose reason is given."""

    intra_op_threads: int | None = None  # None = choose by measurement
    allow_spinning: bool | None = None
    inline_run_below_us: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)  # setting -> why, where not configured

    def source(self, name: str) -> str:
        return self.reasons.get(name, "configured")


class Stopwatch:
    """Times runs against a shared budget; the clock is injected so decisions can be tested."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, budget: float = BUDGET_SECONDS) -> None:
        self.clock = clock
        self.deadline = clock() + budget

    def left(self) -> float:
        return self.deadline - self.clock()

    def median(self, run: Callable[[], object], runs: int = RUNS_PER_TRIAL, share: float = 1.0) -> float:
        """Median seconds of up to `runs` calls after one untimed call, within `share` of what is left."""
        run()
        stop = self.clock() + max(0.0, self.left()) * share
        times: list[float] = []
        while len(times) < runs and (not times or self.clock() < stop):
            begin = self.clock()
            run()
            times.append(self.clock() - begin)
        return statistics.median(times)


def thread_candidates(cores: int, instances: int) -> list[int]:
    """1, 2, 4 ... up to the cores each instance may use (never oversubscribing the machine)."""
    limit = max(1, cores // max(1, instances))
    counts, threads = [], 1
    while threads < limit:
        counts.append(threads)
        threads *= 2
    return counts + [limit]


def fewest_good_threads(times: dict[int, float]) -> int:
    """The fewest threads whose runs are within reach of the fastest: each doubling must pay."""
    chosen = min(times)
    for threads in sorted(times):
        gain = times[chosen] - times[threads]
        if gain > times[chosen] * MORE_THREADS_GAIN and gain >= MORE_THREADS_MIN_SECONDS:
            chosen = threads
    return chosen


def may_spin(threads: int, cores: int, instances: int) -> bool:
    """Spinning pool threads keep a core busy between a light model's runs: only where one is left
    for the event loop and gRPC, which such a model keeps busy."""
    return threads > 1 and cores >= threads * instances + 2


def goes_inline(run_seconds: float, handoff_seconds: float) -> bool:
    """A batch runs on the event loop when handing it to a thread costs more than running it."""
    return run_seconds < handoff_seconds and run_seconds * 1e6 < INLINE_STALL_LIMIT_US


def calibrate(
    open_run: OpenRun,
    handoff: Callable[[], object],
    fixed: Fixed,
    cores: int,
    instances: int,
    max_batch_size: int,
    stopwatch: Stopwatch | None = None,
) -> Choice:
    """Measure what `fixed` leaves open and choose it; raises what a run raises."""
    watch = stopwatch or Stopwatch()
    sizes = [1, min(LARGER_BATCH, max_batch_size)] if max_batch_size > 1 else [1]
    timings: list[tuple[int, bool, int, float]] = []
    sources = {name: fixed.source(name) for name in SETTINGS}

    def trial(threads: int, spinning: bool, share: float) -> float:
        """Seconds per run of the largest batch measured; every size is recorded. A model whose
        batch 1 already takes HEAVY_RUN_SECONDS is timed at batch 1 alone, in every trial."""
        run = open_run(threads, spinning)
        first = not timings  # only the first trial decides the sizes, so every trial times the same
        for index, batch in enumerate(list(sizes)):
            seconds = watch.median(lambda: run(batch), share=share / (len(sizes) - index))
            timings.append((threads, spinning, batch, seconds))
            if first and batch == 1 and seconds > HEAVY_RUN_SECONDS:
                del sizes[1:]
                break
        return seconds

    def timed(threads: int, spinning: bool) -> float | None:
        return next((sec for t, s, b, sec in reversed(timings) if (t, s) == (threads, spinning)), None)

    threads = fixed.intra_op_threads
    if threads is None:
        candidates = thread_candidates(cores, instances)
        times = {}
        spinning = bool(fixed.allow_spinning)  # time the threads as they will run, where that is fixed
        for index, count in enumerate(candidates):  # each at least once, even past the budget
            times[count] = trial(count, spinning, share=0.6 / (len(candidates) - index))
        threads = fewest_good_threads(times)
        sources["intra_op_thread_count"] = "measured"
    spinning = fixed.allow_spinning
    if spinning is None:
        spinning = False
        if threads > 1:
            still = timed(threads, False) or trial(threads, False, share=0.3)
            if still >= HEAVY_RUN_SECONDS:
                spinning = True  # onnxruntime's default: the loop has little to do while such a batch computes
            elif may_spin(threads, cores, instances) and watch.left() > 0:
                spinning = trial(threads, True, share=0.5) < still * (1 - SPIN_GAIN)
        sources["allow_spinning"] = "measured"
    inline_us = fixed.inline_run_below_us
    handoff_us = run_seconds = None
    if inline_us is None:
        run_seconds = timed(threads, spinning) or timed(threads, False) or trial(threads, spinning, share=0.5)
        handoff_seconds = watch.median(handoff, runs=HANDOFF_TRIALS, share=1.0)
        handoff_us = handoff_seconds * 1e6
        inline_us = INLINE_STALL_LIMIT_US if goes_inline(run_seconds, handoff_seconds) else 0
        sources["inline_run_below_us"] = "measured"
    return Choice(threads, spinning, inline_us, sources, tuple(timings), handoff_us, run_seconds)


def previous_defaults(fixed: Fixed, cores: int, instances: int) -> Choice:
    """The settings used before calibration existed: one core's share per instance, onnxruntime's
    own spinning, batches in the thread."""
    threads = fixed.intra_op_threads or max(1, cores // max(1, instances))
    spinning = threads > 1 if fixed.allow_spinning is None else fixed.allow_spinning
    inline = fixed.inline_run_below_us or 0
    sources = {
        name: fixed.source(name) if value is not None else "previous default"
        for name, value in zip(SETTINGS, (fixed.intra_op_threads, fixed.allow_spinning, fixed.inline_run_below_us))
    }
    return Choice(threads, spinning, inline, sources)


def fallback(fixed: Fixed, cores: int, instances: int, reason: str) -> Choice:
    """For a model that cannot be measured (it does not run on zeros): the previous defaults."""
    choice = previous_defaults(fixed, cores, instances)
    return dataclasses.replace(choice, note=f"calibration failed, using the previous defaults: {reason}")
