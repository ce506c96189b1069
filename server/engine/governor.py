"""Tenant limits (--tenant-limits), enforced on the numbers the server bills.

Before a request is decoded, its tenant's request rate (a token bucket with burst), its requests in
flight and its spend in the current UTC hour, day and month are checked against its limits; after
decoding, its rows against the row rate. Over a limit, the request is refused at once (TenantRefused:
RESOURCE_EXHAUSTED, or 429 with Retry-After), costs nothing and is written to the usage log as
refused. Spend is what the cost ledger charged each request (the same share the usage log bills),
so a budget stops a tenant within the cost of the requests already admitted when it was reached.

The invariant: a tenant's spend in a window is the sum of the costs of its requests settled in
that window (since the server started, plus what the usage log held for the window at start); so a
restart cannot reset a budget. With several replicas, each enforces the whole budget on its own
spend: a tenant spreading evenly over N replicas can spend up to N times its budget; give each
replica budget / N to bound it (README, "Tenant limits")."""

import datetime
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.engine.tenant_limits import WINDOWS, TenantLimit, TenantLimits
from server.errors import TenantRefused

log = logging.getLogger(__name__)


_BOUNDS: dict[str, tuple[float, float]] = {}  # window -> the last (start, end) computed: the current one


def current_start(window: str, at: float) -> float:
    """window_start, without building dates for every request: the last window's bounds are kept."""
    start, end = _BOUNDS.get(window, (1.0, 0.0))
    if not start <= at < end:
        start, end = window_start(window, at), window_end(window, at)
        _BOUNDS[window] = (start, end)
    return start


def window_start(window: str, at: float) -> float:
    """The start of the UTC hour, day or month holding `at` (seconds since the epoch)."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    if window == "hour":
        moment = moment.replace(minute=0, second=0, microsecond=0)
    elif window == "day":
        moment = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        moment = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return moment.timestamp()


def window_end(window: str, at: float) -> float:
    start = datetime.datetime.fromtimestamp(window_start(window, at), datetime.UTC)
    if window == "hour":
        return (start + datetime.timedelta(hours=1)).timestamp()
    if window == "day":
        return (start + datetime.timedelta(days=1)).timestamp()
    following = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return following.timestamp()


@dataclass
class Bucket:
    """A token bucket: `rate` tokens a second, at most `capacity` held."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, amount: float, now: float) -> float:
        """0 when `amount` tokens were taken; else the seconds until they would be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount <= self.tokens or self.tokens >= self.capacity:  # one bigger than the burst: when full
            self.tokens -= amount
            return 0.0
        return (min(amount, self.capacity) - self.tokens) / self.rate


@dataclass
class Spend:
    """A tenant's spend in each window: (the window's start, dollars)."""

    windows: dict[str, tuple[float, float]]

    def add(self, dollars: float, at: float) -> None:
        for window in WINDOWS:
            start = current_start(window, at)
            began, spent = self.windows.get(window, (start, 0.0))
            self.windows[window] = (start, spent + dollars if began == start else dollars)

    def spent(self, window: str, now: float) -> float:
        began, spent = self.windows.get(window, (0.0, 0.0))
        return spent if began == current_start(window, now) else 0.0


class Governor:
    def __init__(
        self,
        limits: Callable[[], TenantLimits],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limits, self.clock, self.wall = limits, clock, wall
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self.in_flight: dict[str, int] = {}
        self.spend: dict[str, Spend] = {}
        self.refused: dict[tuple[str, str], int] = {}  # (tenant's /metrics label, reason) -> count
        self.labels: dict[str, str] = {}  # tenant -> its /metrics label

    def limit(self, tenant: str) -> TenantLimit:
        return self.limits().of(tenant)

    def admit(self, tenant: str, label: str) -> None:
        """A request of `tenant` may go on to be decoded; TenantRefused says which limit it met."""
        self.labels[tenant] = label
        limit, now = self.limit(tenant), self.wall()
        for window in WINDOWS:
            budget = limit.budget(window)
            if budget is not None and self.spent(tenant, window, now) >= budget:
                self._refuse(
                    tenant,
                    f"budget_{window}",
                    f"its budget of ${budget:g} this {window} is spent",
                    window_end(window, now) - now,
                )
        if limit.max_in_flight is not None and self.in_flight.get(tenant, 0) >= limit.max_in_flight:
            self._refuse(tenant, "max_in_flight", f"{limit.max_in_flight} of its requests are in flight", 1.0)
        if limit.requests_per_second is not None:
            self._take(tenant, "requests", 1, limit.requests_per_second, limit.request_burst)
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1

    def admit_rows(self, tenant: str, rows: int) -> None:
        limit = self.limit(tenant)
        if limit.rows_per_second is not None:
            self._take(tenant, "rows", rows, limit.rows_per_second, limit.row_burst)

    def release(self, tenant: str) -> None:
        left = self.in_flight.get(tenant, 1) - 1
        if left > 0:
            self.in_flight[tenant] = left
        else:
            self.in_flight.pop(tenant, None)

    def charge(self, tenant: str, dollars: float, at: float | None = None) -> None:
        self.spend.setdefault(tenant, Spend({})).add(dollars, self.wall() if at is None else at)

    def spent(self, tenant: str, window: str, now: float | None = None) -> float:
        found = self.spend.get(tenant)
        return found.spent(window, self.wall() if now is None else now) if found is not None else 0.0

    def priority(self, tenant: str) -> int:
        return self.limit(tenant).priority

    def rebuild(self, records: Iterable[tuple[str, float, float]]) -> int:
        """Spend from the usage log's (tenant, time, dollars) records of the current windows."""
        month, count = window_start("month", self.wall()), 0
        for tenant, at, dollars in records:
            if at >= month and dollars:
                self.charge(tenant, dollars, at)
                count += 1
        return count

    def _take(self, tenant: str, kind: str, amount: int, rate: float, burst: float) -> None:
        key, now = (tenant, kind), self.clock()
        bucket = self.buckets.get(key)
        if bucket is None or (bucket.rate, bucket.capacity) != (rate, burst):  # new, or its limits changed
            bucket = self.buckets[key] = Bucket(rate, burst, burst, now)
        wait = bucket.take(amount, now)
        if wait:
            what = "request" if kind == "requests" else "row"
            self._refuse(
                tenant, f"{kind}_per_second", f"over its rate of {rate:g} {what}s a second (burst {burst:g})", wait
            )

    def _refuse(self, tenant: str, reason: str, said: str, retry_after: float) -> None:
        key = (self.labels.get(tenant, tenant), reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        raise TenantRefused(
            f"tenant '{tenant}' is refused: {said} ({reason}); it resets in {retry_after:.1f} s",
            reason,
            retry_after,
        )


def limits_snapshot(governor: Governor) -> dict[str, list]:
    """For /metrics, by each tenant's label: refusals, in flight, and each window's spend and budget."""
    now, labels = governor.wall(), governor.labels
    spend, budgets, in_flight = {}, {}, {}
    for tenant, label in labels.items():
        limit = governor.limit(tenant)
        in_flight[label] = in_flight.get(label, 0) + governor.in_flight.get(tenant, 0)
        for window in WINDOWS:
            spend[label, window] = spend.get((label, window), 0.0) + governor.spent(tenant, window, now)
            if (budget := limit.budget(window)) is not None:
                budgets[label, window] = budgets.get((label, window), 0.0) + budget
    return {
        "refused": sorted(governor.refused.items()),
        "in_flight": sorted(in_flight.items()),
        "spend": sorted(spend.items()),
        "budget": sorted(budgets.items()),
    }
