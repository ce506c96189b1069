"""Who rides in a full batch when several tenants wait: each tenant gets rows in proportion to its
weight (--tenant-limits; 1 without it), and what a tenant does not need goes to the others (max-min
fairness, water-filling). A tenant that floods a saturated server then fills only its share of each
batch: another tenant's request joins the next batch instead of waiting behind the flood's queue.
Within a tenant, and within the batch, requests keep their priority and arrival order; the oldest
request always rides, so nothing waits forever. Used by batching.Batcher only when a batch is full
and more than one tenant waits: one tenant alone is batched as before."""

from collections.abc import Callable, Iterable

from server.engine.queued import QueuedRequest


def fair_batch(
    waiting: Iterable[QueuedRequest], head: QueuedRequest, max_rows: int, weight: Callable[[str], float]
) -> list[QueuedRequest]:
    """The batch to run: compatible waiting requests (as `head`), shared between tenants by weight."""
    by_tenant: dict[str, list[QueuedRequest]] = {}
    for item in waiting:  # priority, then arrival order
        if item.shape_key == head.shape_key:
            by_tenant.setdefault(item.tenant, []).append(item)
    demand = {tenant: sum(item.rows for item in items) for tenant, items in by_tenant.items()}
    quota = allocate(demand, {tenant: max(weight(tenant), 1e-9) for tenant in demand}, max_rows)
    quota[head.tenant] = max(quota[head.tenant], head.rows)  # the oldest always rides
    chosen, rows = [], 0
    for tenant, items in by_tenant.items():
        taken = 0
        for item in items:
            if taken + item.rows > quota[tenant] or rows + item.rows > max_rows:
                break
            chosen.append(item)
            taken += item.rows
            rows += item.rows
    return chosen


def allocate(demand: dict[str, int], weights: dict[str, float], capacity: int) -> dict[str, int]:
    """Rows per tenant: by weight, a tenant never given more than it asks, what it leaves shared again."""
    quota = dict.fromkeys(demand, 0)
    open_, left = set(demand), capacity
    while open_ and left > 0:
        total = sum(weights[tenant] for tenant in open_)
        shares = {tenant: left * weights[tenant] / total for tenant in open_}
        settled = [tenant for tenant in open_ if demand[tenant] - quota[tenant] <= shares[tenant]]
        if not settled:  # every tenant wants more than its share: each gets its share, rounded down
            for tenant in open_:
                quota[tenant] += int(shares[tenant])
            return quota
        for tenant in settled:
            left -= demand[tenant] - quota[tenant]
            quota[tenant] = demand[tenant]
            open_.discard(tenant)
    return quota


class Weights:
    """Each tenant's weight, for every model's batcher: 1 each, or what --tenant-limits gives (the
    composition root calls `use` once it has read the file; a re-read file applies at once)."""

    def __init__(self) -> None:
        self._of: Callable[[str], float] = lambda tenant: 1.0

    def use(self, of: Callable[[str], float]) -> None:
        self._of = of

    def of(self, tenant: str) -> float:
        return self._of(tenant)


WEIGHTS = Weights()
