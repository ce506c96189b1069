"""Dynamic batching for one model version.

Requests wait in a bounded, prioritised queue; each instance worker takes the
next batch of compatible requests (same non-batch shapes), runs the injected
`execute`, splits the outputs by row offsets and resolves every caller exactly
once with its own rows. Knows nothing of gRPC or onnxruntime.
"""

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from server.config import BatchingSettings
from server.errors import DeadlineExceeded, ExecutionFailed, InvalidInput, Overloaded, ShuttingDown
from server.events import BatchExecuted, BatchStarted, EventBus, QueueDepthChanged

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Execute = Callable[[Feeds, list[str], int], Awaitable[Feeds]]
"""execute(feeds, output_names, instance) -> outputs by name."""

_batch_ids = itertools.count(1)  # process-wide, so a batch id names one execution of any model


@dataclass(eq=False, slots=True)
class QueuedRequest:
    feeds: Feeds
    rows: int
    outputs: tuple[str, ...]
    level: int
    arrival: float  # loop.time()
    future: asyncio.Future
    shape_key: tuple = ()
    queued: bool = True  # until its batch takes it or its caller gives up
    taken: float = 0.0  # loop.time() when its batch left the queue


@dataclass(frozen=True, slots=True)
class Answer:
    """One caller's own output rows, and what its batch went through."""

    outputs: Feeds
    batch_id: int
    batch_rows: int
    device: str
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True, slots=True)
class Batch:
    requests: list[QueuedRequest]
    rows: int


@dataclass
class Batcher:
    """Queue and workers of one model version; `instances` batches run at once."""

    execute: Execute
    settings: BatchingSettings
    instances: int
    model: str
    version: str
    bus: EventBus
    devices: tuple[str, ...]  # per instance: "cpu" or "cuda:N"
    _queues: list[collections.deque] = field(init=False)
    _depth: int = field(default=0, init=False)
    _wakeup: asyncio.Event = field(init=False)
    _workers: list[asyncio.Task] = field(default_factory=list, init=False)
    _closing: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if len(self.devices) != self.instances:
            raise ValueError(f"{self.label}: {self.instances} instances but devices {self.devices}")
        self._queues = [collections.deque() for _ in range(self.settings.priority_levels + 1)]
        self._wakeup = asyncio.Event()

    @property
    def label(self) -> str:
        return f"model '{self.model}' version {self.version}"

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"batcher {self.model}:{self.version}#{i}")
            for i in range(self.instances)
        ]

    async def close(self) -> None:
        """Stop accepting, run what is queued, then stop the workers."""
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(*self._workers)

    async def submit(
        self,
        feeds: Feeds,
        rows: int,
        outputs: tuple[str, ...],
        *,
        priority: int = 0,
        timeout_us: int = 0,
    ) -> Answer:
        """Queue one request and wait for its own output rows."""
        if self._closing:
            raise ShuttingDown(f"{self.label}: the server is shutting down")
        max_queue = self.settings.queue_policy.max_queue_size
        if max_queue and self._depth >= max_queue:
            raise Overloaded(f"{self.label}: queue is full ({max_queue} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        item = QueuedRequest(
            feeds=feeds,
            rows=rows,
            outputs=outputs,
            level=self._level(priority),
            arrival=loop.time(),
            future=loop.create_future(),
            shape_key=self._shape_key(feeds),
        )
        self._enqueue(item)
        timeout = self._timeout_seconds(timeout_us)
        try:
            if timeout is not None:
                await asyncio.wait((item.future,), timeout=timeout)
                if item.queued:
                    self._drop(item)
                    raise DeadlineExceeded(f"{self.label}: request timed out after {timeout * 1e6:.0f} us in the queue")
            return await item.future
        except asyncio.CancelledError:
            self._drop(item)
            raise

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
        return tuple((name, array.dtype.str, array.shape[1:]) for name, array in feeds.items())

    def _enqueue(self, item: QueuedRequest) -> None:
        self._queues[item.level].append(item)
        self._set_depth(self._depth + 1)
        self._wakeup.set()

    def _drop(self, item: QueuedRequest) -> None:
        """A caller gave up: out of the queue if still there; its rows are discarded if running."""
        if item.queued:
            item.queued = False
            self._queues[item.level].remove(item)
            self._set_depth(self._depth - 1)
        item.future.cancel()

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self.bus.publish(QueueDepthChanged(self.model, self.version, depth))

    def _waiting(self):
        for queue in self._queues[1:] + self._queues[:1]:  # level 1 is highest; 0 = unprioritised
            yield from queue

    # --- batch formation ----------------------------------------------------------------------

    def _candidate(self, now: float) -> tuple[list[QueuedRequest], float]:
        """The next batch in priority then arrival order, and when it may leave."""
        waiting = self._waiting()
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
        if full or rows == max_rows or self._closing:
            return chosen, now
        preferred = self._preferred_prefix(chosen)
        if preferred:
            return preferred, now
        return chosen, head.arrival + self.settings.max_queue_delay_us / 1e6

    def _preferred_prefix(self, chosen: list[QueuedRequest]) -> list[QueuedRequest]:
        sizes = self.settings.preferred_batch_sizes
        best, rows = 0, 0
        for count, item in enumerate(chosen, start=1):
            rows += item.rows
            if rows in sizes:
                best = count
        return chosen[:best]

    async def _next_batch(self) -> Batch | None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            chosen, leave_at = self._candidate(now)
            if chosen and leave_at <= now:
                return self._take(chosen)
            if not chosen and self._closing:
                return None
            self._wakeup.clear()
            delay = None if not chosen else leave_at - now
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                pass

    def _take(self, chosen: list[QueuedRequest]) -> Batch:
        now = asyncio.get_running_loop().time()
        for item in chosen:
            self._queues[item.level].remove(item)
            item.queued = False
            item.taken = now
        self._set_depth(self._depth - len(chosen))
        return Batch(requests=chosen, rows=sum(item.rows for item in chosen))

    # --- execution ----------------------------------------------------------------------------

    async def _worker(self, instance: int) -> None:
        while (batch := await self._next_batch()) is not None:
            live = [item for item in batch.requests if not item.future.done()]
            if live:
                await self._run(Batch(live, sum(item.rows for item in live)), instance)

    async def _run(self, batch: Batch, instance: int) -> None:
        batch_id, device = next(_batch_ids), self.devices[instance]
        started = time.perf_counter()
        self.bus.publish(BatchStarted(self.model, self.version, batch_id, device, started))
        marks: list[float] = [started]  # start, inputs gathered, runtime returned, outputs split
        try:
            feeds = concatenate(batch.requests)
            marks.append(time.perf_counter())
            outputs = await self.execute(feeds, union_outputs(batch.requests), instance)
            marks.append(time.perf_counter())
            results = self._split(batch, outputs)
            marks.append(time.perf_counter())
        except Exception as err:  # every caller of the batch gets the failure, exactly once
            failure = err if isinstance(err, ExecutionFailed) else ExecutionFailed(f"{self.label}: {err!r}")
            log.error("%s: batch of %d rows failed: %r", self.label, batch.rows, err)
            for item in batch.requests:
                _set_exception(item.future, failure)
        else:
            compute = marks[-1] - started
            for item, result in zip(batch.requests, results):
                _set_result(item.future, Answer(result, batch_id, batch.rows, device, item.taken - item.arrival, compute))
        finally:
            # Callers resume only on a later loop turn, so observers have priced the batch by then.
            self.bus.publish(self._executed(batch, batch_id, device, instance, marks))

    def _executed(self, batch: Batch, batch_id: int, device: str, instance: int, marks: list[float]) -> BatchExecuted:
        succeeded = len(marks) == 4
        finished = marks[-1] if succeeded else time.perf_counter()
        ends = (marks[1:] + [finished] * 3)[:3]  # a failure leaves the rest of the time in its phase
        return BatchExecuted(
            model=self.model,
            version=self.version,
            batch_id=batch_id,
            device=device,
            rows=batch.rows,
            requests=len(batch.requests),
            instance=instance,
            started=marks[0],
            finished=finished,
            succeeded=succeeded,
            input_seconds=ends[0] - marks[0],
            infer_seconds=ends[1] - ends[0],
            output_seconds=ends[2] - ends[1],
            queue_seconds=tuple(item.taken - item.arrival for item in batch.requests),
        )

    def _split(self, batch: Batch, outputs: Feeds) -> list[Feeds]:
        if len(batch.requests) == 1:
            item = batch.requests[0]
            return [{name: outputs[name] for name in item.outputs}]
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != batch.rows:
                raise ExecutionFailed(
                    f"{self.label}: output '{name}' has shape {list(array.shape)}; "
                    f"its first dimension should be the batch size {batch.rows}"
                )
        results, offset = [], 0
        for item in batch.requests:
            end = offset + item.rows
            results.append({name: outputs[name][offset:end] for name in item.outputs})
            offset = end
        return results


def concatenate(requests: list[QueuedRequest]) -> Feeds:
    if len(requests) == 1:
        return requests[0].feeds
    return {name: np.concatenate([item.feeds[name] for item in requests]) for name in requests[0].feeds}


def union_outputs(requests: list[QueuedRequest]) -> list[str]:
    names: dict[str, None] = {}
    for item in requests:
        names.update(dict.fromkeys(item.outputs))
    return list(names)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
