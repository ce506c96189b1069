"""onnxserve-tune's time: how long a measurement takes, sized to the budget, and what is left of
the budget. Pure, with the clock passed in."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

COARSE_SHARE = 0.6  # of the budget, for the coarse sweep; refinement and rate probes share the rest


@dataclass(frozen=True)
class MeasurePlan:
    """How one (configuration, rate) point is measured, sized to the budget."""

    warmup_s: float
    min_window_s: float
    max_window_s: float
    tail_requests: int = 20  # requests beyond the 99th percentile wanted in a window: 2,000 requests
    min_windows: int = 2
    max_windows: int = 4
    expected_windows: int = 3  # what a point takes on average on a shared machine: for estimates
    tolerance: float = 0.15  # two windows' p99s agreeing within this are stable
    overhead_s: float = 0.5  # scrapes, the load request's round trip

    def window_s(self, rate: float) -> float:
        wanted = self.tail_requests * 100 / rate
        return min(self.max_window_s, max(self.min_window_s, wanted))

    def estimate_s(self, rate: float, load_s: float) -> float:
        """Expected seconds for a point: the load (0 if the configuration serves already), the
        warm-up and the usual number of windows; each window past the fewest is checked against
        the budget before it starts."""
        return load_s + self.warmup_s + self.expected_windows * self.window_s(rate) + self.overhead_s


def plan_for_budget(budget_s: float) -> MeasurePlan:
    """Short budgets get short windows (and say so through the noise they measure)."""
    return MeasurePlan(
        warmup_s=min(2.0, max(0.5, budget_s / 60)),
        min_window_s=min(3.0, max(1.0, budget_s / 40)),
        max_window_s=min(10.0, max(1.5, budget_s / 40)),
    )


class Budget:
    """Seconds allowed for the whole tune, and what is left of them."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self.started = clock()

    @property
    def spent(self) -> float:
        return self.clock() - self.started

    @property
    def remaining(self) -> float:
        return self.seconds - self.spent

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.remaining


def config_estimate_s(rates: Sequence[float], plan: MeasurePlan, load_s: float) -> float:
    """A configuration loaded once and measured at every rate."""
    return sum(plan.estimate_s(rate, load_s if i == 0 else 0.0) for i, rate in enumerate(rates))


def coarse_count(candidates: int, rates: Sequence[float], plan: MeasurePlan, load_s: float, seconds: float) -> int:
    """How many coarse configurations fit in `seconds` (the coarse share of what is left), at
    every rate; at least two (the model's own and one other), so that there is a comparison."""
    fitting = int(seconds * COARSE_SHARE // config_estimate_s(rates, plan, load_s))
    return max(min(2, candidates), min(candidates, fitting))
