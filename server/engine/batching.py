"""Dynamic batching for one model version.

Requests wait in a bounded, prioritised queue; whenever an instance is free the
batcher takes the next batch of compatible requests (same non-batch shapes), runs
the injected `execute`, splits the outputs by row offsets and resolves every caller
exactly once with its own rows. Knows nothing of gRPC or onnxruntime.

Batches are formed by loop callbacks, not worker tasks: a request that arrives while
an instance is free schedules one dispatch for the end of the current loop turn, so
every request decoded in that turn joins the same batch. `execute` returns the outputs
when it ran the batch on the loop itself (a model faster than a thread handoff), or an
awaitable when the batch runs elsewhere; the instance is free again when it resolves.
"""

import asyncio
import bisect
import collections
import inspect
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server.engine.fair_share import WEIGHTS, fair_batch
from server.engine.queued import (
    Answer,
    Batch,
    Feeds,
    QueuedRequest,
    concatenate,
    executed_event,
    fail,
    resolve,
    run_after,
    run_outcome,
    split_outputs,
    union_outputs,
)
from server.errors import DeadlineExceeded, ExecutionFailed, InvalidInput, Overloaded, ShuttingDown
from server.models.model_config import BatchingSettings
from server.observe.events import BatchStarted, EventBus

__all__ = ["Answer", "Batcher", "QueuedRequest"]

log = logging.getLogger(__name__)

Execute = Callable[[Feeds, list[str], int], "Feeds | Awaitable[Feeds]"]
"""execute(feeds, output_names, instance) -> outputs by name, or an awaitable of them."""

# Per batch: the estimate of callers at once (a peak) drops by one caller only after dozens of
# batches that did not reach it, so batches keep waiting for as many as came before.
CALLERS_DECAY = 0.99
_batch_ids = itertools.count(1)  # process-wide, so a batch id names one execution of any model


@dataclass
class Batcher:
    """Queue and dispatch of one model version; `instances` batches run at once."""

    execute: Execute
    settings: BatchingSettings
    instances: int
    model: str
    version: str
    bus: EventBus
    devices: tuple[str, ...]  # per instance: "cpu" or "cuda:N"
    # A queue per priority level with requests waiting, none per level configured: a config's
    # levels cost nothing until used. _active: those levels in the order they are served.
    _queues: dict[int, collections.deque] = field(init=False)
    _active: list[int] = field(init=False)
    _depth: int = field(default=0, init=False)
    _free: list[int] = field(init=False)  # instances with no batch running
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _dispatch_scheduled: bool = field(default=False, init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False)
    _closing: bool = field(default=False, init=False)
    _drained: asyncio.Future | None = field(default=None, init=False)
    _uncollected: int = field(default=0, init=False)  # submitted, and the caller has not resumed yet
    _overlap_at: float = field(default=float("-inf"), init=False)  # loop.time() callers last overlapped
    _callers: float = field(default=1.0, init=False)  # callers recently here at once (a decaying peak)
    _running: int = field(default=0, init=False)  # requests in batches that run now
    _pinned: int = field(default=0, init=False)  # queued requests that only one instance may run
    _tenants: dict[str, int] = field(default_factory=dict, init=False)  # queued requests per tenant

    def __post_init__(self) -> None:
        if len(self.devices) != self.instances:
            raise ValueError(f"{self.label}: {self.instances} instances but devices {self.devices}")
        self._queues, self._active = {}, []
        self._free = list(range(self.instances - 1, -1, -1))  # pop() hands out instance 0 first

    @property
    def label(self) -> str:
        return f"model '{self.model}' version {self.version}"

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Stop accepting, run what is queued, then return once every instance is idle."""
        if self._drained is not None:
            return await self._drained
        self._closing = True
        self._drained = self._loop.create_future()
        self._schedule()
        self._check_drained()
        await self._drained

    async def submit(self, feeds: Feeds, rows: int, outputs: tuple[str, ...], **options) -> Answer:
        """Queue one request and wait for its own output rows; `options` as `prepare` takes them."""
        return await self.collect(self.enqueue(feeds, rows, outputs, **options))

    async def collect(self, item: QueuedRequest) -> Answer:
        """Wait for a queued request's own rows; a caller that gives up leaves the queue."""
        try:
            return await item.future
        except asyncio.CancelledError:
            self.cancel(item)
            raise

    def enqueue(
        self, feeds: Feeds, rows: int, outputs: tuple[str, ...], *, priority=0, timeout_us=0, tenant="unknown"
    ) -> QueuedRequest:
        """Queue one request; its `future` resolves with its Answer (or the error that ended it).
        For callers that do not await it in a task of their own, such as the requests of a stream."""
        item = self.prepare(feeds, rows, outputs, priority=priority, timeout_us=timeout_us, tenant=tenant)
        self.admit(item)
        return item

    def prepare(
        self,
        feeds: Feeds,
        rows: int,
        outputs: tuple[str, ...],
        *,
        priority: int = 0,
        timeout_us: int = 0,
        tenant: str = "unknown",
    ) -> QueuedRequest:
        """A request checked and on its timeout's clock, not yet queued: `admit` queues it. A sequence's
        request waits between the two for the one before it (sequences.py)."""
        if self._closing:
            raise ShuttingDown(
                f"{self.label} is closing (unloaded, replaced by a reload, or the server is stopping); retry"
            )
        max_queue = self.settings.queue_policy.max_queue_size
        if max_queue and self._depth >= max_queue:
            raise Overloaded(f"{self.label}: queue is full ({max_queue} requests waiting); retry later")
        loop = self._loop
        item = QueuedRequest(
            feeds=feeds,
            rows=rows,
            outputs=outputs,
            level=self._level(priority),
            arrival=loop.time(),
            future=loop.create_future(),
            queued=False,
            tenant=tenant,
        )
        timeout = self._timeout_seconds(timeout_us)
        if timeout is not None:
            expiry = loop.call_later(timeout, self._expire, item, timeout)
            item.future.add_done_callback(lambda _: expiry.cancel())
        return item

    def admit(self, item: QueuedRequest) -> None:
        """Queue a prepared request: it leaves in a batch, or with its caller or its timeout."""
        item.shape_key, item.owner = self._shape_key(item.feeds), self
        if self._uncollected:
            self._overlap_at = self._loop.time()
            self._callers = max(self._callers, self._uncollected + 1.0)
        self._enqueue(item)
        self._uncollected += 1
        item.future.add_done_callback(self._collected)  # runs when its caller would resume

    def cancel(self, item: QueuedRequest) -> None:
        """The caller gave up: out of the queue if still there; its rows are discarded if running."""
        self._unqueue(item)
        item.future.cancel()

    def _collected(self, _: asyncio.Future) -> None:
        self._uncollected -= 1

    # --- queue ------------------------------------------------------------------------------

    def _level(self, priority: int) -> int:
        levels = self.settings.priority_levels
        if not levels:
            return 0
        if priority == 0:
            return self.settings.default_priority_level or levels
        if not 1 <= priority <= levels:
            raise InvalidInput(f"{self.label}: priority {priority} is outside 1..{levels} (1 is highest)")
        return priority

    def _timeout_seconds(self, requested_us: int) -> float | None:
        policy = self.settings.queue_policy
        default_us = policy.default_timeout_us
        if requested_us <= 0:
            chosen = default_us
        elif not default_us:
            chosen = requested_us
        elif policy.allow_timeout_override:
            chosen = min(requested_us, default_us)
        else:
            chosen = default_us
        return chosen / 1e6 if chosen else None

    def _shape_key(self, feeds: Feeds) -> tuple:
        if not self.settings.max_batch_size:
            return ()
        return tuple((name, array.dtype, array.shape[1:]) for name, array in feeds.items())

    def _enqueue(self, item: QueuedRequest) -> None:
        queue = self._queues.get(item.level)
        if queue is None:
            queue = self._queues[item.level] = collections.deque()
            last = self.settings.priority_levels + 1  # level 1 is served first, 0 (unprioritised) last
            bisect.insort(self._active, item.level, key=lambda level: level or last)
        queue.append(item)
        item.queued = True
        self._tenants[item.tenant] = self._tenants.get(item.tenant, 0) + 1
        self._depth += 1
        self._pinned += item.instance >= 0
        self._schedule()

    def _expire(self, item: QueuedRequest, timeout: float) -> None:
        if not item.taken:  # else its batch took it in time
            self._unqueue(item)
            message = f"{self.label}: request timed out after {timeout * 1e6:.0f} us in the queue"
            fail(item.future, DeadlineExceeded(message))

    def _unqueue(self, item: QueuedRequest) -> None:
        """Out of the queue it is in: its owner's, which a sequence's request can outlive (a reload)."""
        if item.owner is not None and item.owner is not self:
            item.owner._unqueue(item)
        elif item.queued:
            item.queued = False
            self._queues[item.level].remove(item)
            self._retire_if_empty(item.level)
            self._depth -= 1
            self._pinned -= item.instance >= 0
            self._left(item.tenant)

    def _left(self, tenant: str) -> None:
        count = self._tenants[tenant] - 1
        if count:
            self._tenants[tenant] = count
        else:
            del self._tenants[tenant]

    def _retire_if_empty(self, level: int) -> None:
        if not self._queues[level]:
            del self._queues[level]
            self._active.remove(level)

    def _waiting(self):
        for level in self._active:
            yield from self._queues[level]

    def _waiting_for(self, instance: int):
        """What `instance` may run: requests pinned to it (a sequence's slot) and those any may run."""
        for item in self._waiting():
            if item.instance < 0 or item.instance == instance:
                yield item

    # --- batch formation ----------------------------------------------------------------------

    def _pinned_next(self, now: float) -> tuple[int, list[QueuedRequest], float]:
        """With requests pinned to one instance (a sequence's slot): the free instance whose batch may
        leave soonest, that batch, and when."""
        best: tuple[int, list[QueuedRequest], float] = (self._free[-1], [], float("inf"))
        for instance in reversed(self._free):
            chosen, leave_at = self._candidate(now, instance)
            if chosen and leave_at < best[2]:
                best = (instance, chosen, leave_at)
        return best

    def _candidate(self, now: float, instance: int = -1) -> tuple[list[QueuedRequest], float]:
        """The next batch (for `instance`, where requests are pinned) in priority then arrival order,
        and when it may leave."""
        waiting = self._waiting_for(instance) if self._pinned else self._waiting()
        head = next(waiting, None)
        if head is None:
            return [], float("inf")
        max_rows = self.settings.max_batch_size
        if not max_rows:
            return [head], now
        chosen, rows, full = [head], head.rows, False
        for item in waiting:
            if item.shape_key != head.shape_key:
                continue
            if rows + item.rows > max_rows:
                full = True
                break
            chosen.append(item)
            rows += item.rows
        if full and len(self._tenants) > 1:  # more wait than fit, from several tenants: shared by weight
            waiting = self._waiting_for(instance) if self._pinned else self._waiting()
            return fair_batch(waiting, head, max_rows, WEIGHTS.of), now
        if full or rows == max_rows or self._closing:
            return chosen, now
        preferred = self._preferred_prefix(chosen)
        if preferred:
            return preferred, now
        return chosen, head.arrival + self._delay(now, len(chosen))

    def _delay(self, now: float, requests: int) -> float:
        """Seconds the oldest request may wait for a fuller batch: the configured delay, else the
        adaptive one while callers overlap and fewer are in the batch than recently came at once.
        A gRPC server hands calls to the loop about one per turn, so without a wait each small
        model's batch would hold one request; with every recent caller in, none is left to wait for."""
        configured = self.settings.max_queue_delay_us
        if configured:
            return configured / 1e6
        adaptive = self.settings.adaptive_delay_us / 1e6
        overlapping = now - self._overlap_at < 2 * adaptive
        expected = math.ceil(self._callers - 0.01) - self._running  # those running cannot join
        return adaptive if overlapping and requests < expected else 0.0

    def _preferred_prefix(self, chosen: list[QueuedRequest]) -> list[QueuedRequest]:
        sizes = self.settings.preferred_batch_sizes
        best, rows = 0, 0
        for count, item in enumerate(chosen, start=1):
            rows += item.rows
            if rows in sizes:
                best = count
        return chosen[:best]

    def _schedule(self) -> None:
        """Dispatch at the end of this loop turn, once, if an instance is free to take a batch."""
        if self._free and not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._free:
            now = self._loop.time()
            if self._pinned:
                instance, chosen, leave_at = self._pinned_next(now)
            else:
                instance = self._free[-1]
                chosen, leave_at = self._candidate(now)
            if not chosen:
                break
            if leave_at > now:  # wait for a fuller batch, at most until the oldest request's delay
                self._timer = self._loop.call_at(leave_at, self._dispatch)
                break
            self._free.pop() if instance == self._free[-1] else self._free.remove(instance)
            self._start(self._take(chosen, now), instance)
            if self._dispatch_scheduled:  # it ran on the loop and finished: let I/O in before the next
                break
        self._check_drained()

    def _take(self, chosen: list[QueuedRequest], now: float) -> Batch:
        for item in chosen:
            queue = self._queues[item.level]
            if queue[0] is item:  # the common case: the batch is the queue's head
                queue.popleft()
            else:
                queue.remove(item)
            self._retire_if_empty(item.level)
            item.queued = False
            item.taken = now
            self._pinned -= item.instance >= 0
            self._left(item.tenant)
        self._depth -= len(chosen)
        self._callers = max(float(len(chosen)), self._callers * CALLERS_DECAY)
        live = [item for item in chosen if not item.future.done()]
        return Batch(live, sum(item.rows for item in live))

    def _check_drained(self) -> None:
        if self._drained is not None and not self._depth and len(self._free) == self.instances:
            resolve(self._drained, None)

    # --- execution ----------------------------------------------------------------------------

    def _start(self, batch: Batch, instance: int) -> None:
        if not batch.requests:
            self._free.append(instance)
            return
        batch.instance, batch.batch_id = instance, next(_batch_ids)
        self._running += len(batch.requests)
        started = time.perf_counter()
        batch.marks.append(started)
        tenants: dict[str, int] = {}
        for item in batch.requests:
            item.batch_id = batch.batch_id
            tenants[item.tenant] = tenants.get(item.tenant, 0) + item.rows
            if item.span is not None:
                batch.traced += (item.span,)
        event = BatchStarted(
            self.model, self.version, batch.batch_id, self.devices[instance], started, tuple(tenants.items())
        )
        self.bus.publish(event)
        try:
            feeds = concatenate(batch.requests)
            batch.marks.append(time.perf_counter())
            outcome = self.execute(feeds, union_outputs(batch.requests), instance)
        except Exception as err:
            self._finish(batch, None, err)
            return
        if not inspect.isawaitable(outcome):  # ran on the loop: answer now
            self._finish(batch, outcome, None)
            return
        running = asyncio.ensure_future(outcome)
        running.add_done_callback(lambda done: self._finish(batch, *run_outcome(done)))

    def _finish(self, batch: Batch, outputs: Feeds | None, error: BaseException | None) -> None:
        device = self.devices[batch.instance]
        try:
            if error is not None:
                raise error
            batch.marks.append(time.perf_counter())
            results = split_outputs(batch, outputs, self.label)
            batch.marks.append(time.perf_counter())
        except Exception as err:  # every caller of the batch gets the failure, exactly once
            failure = err if isinstance(err, ExecutionFailed) else ExecutionFailed(f"{self.label}: {err!r}")
            log.error("%s: batch of %d rows failed: %r", self.label, batch.rows, err)
            for item in batch.requests:
                if item.after is not None:
                    run_after(item, None)
                fail(item.future, failure)
        else:
            compute = batch.marks[-1] - batch.marks[0]
            for item, result in zip(batch.requests, results):
                if item.after is not None:
                    run_after(item, result)
                answer = Answer(result, batch.batch_id, batch.rows, device, item.taken - item.arrival, compute)
                resolve(item.future, answer)
        # Callers resume only on a later loop turn, so observers have priced the batch by then.
        self.bus.publish(executed_event(batch, self.model, self.version, device))
        for item in batch.requests:
            item.executed = True
            if item.on_executed is not None:
                item.on_executed()
        self._running -= len(batch.requests)
        self._free.append(batch.instance)
        self._schedule()
        self._check_drained()
