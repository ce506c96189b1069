"""What waits in a batcher's queue and what it runs: a queued request, a batch, a caller's answer,
the row arithmetic between them (gathering requests into one batch, splitting its outputs), and how
a batch's end reaches its callers (their futures, their hooks) and its observers (BatchExecuted)."""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.engine.device_state import DeviceRows, gather, rows_of, shape_of
from server.errors import ExecutionFailed
from server.observe.events import BatchExecuted

Feeds = dict[str, np.ndarray]

log = logging.getLogger(__name__)


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
    tenant: str = "unknown"  # who is charged for its rows (the name on /metrics)
    batch_id: int = 0  # of the batch that ran it, once one did
    executed: bool = False  # its batch finished (and was priced)
    on_executed: Callable[[], None] | None = None  # for a caller gone while its batch ran
    instance: int = -1  # the only instance that may run it (a sequence's slot: sequences.py); -1: any
    after: Callable[[Feeds | None], None] | None = None  # its own outputs (None: its batch failed) once it ran
    owner: object = None  # the Batcher whose queue it entered (a sequence's may outlive its version's)
    span: object = None  # its request's span context, where it is traced: its batch's span links to it


@dataclass(frozen=True, slots=True)
class Answer:
    """One caller's own output rows, and what its batch went through."""

    outputs: Feeds
    batch_id: int
    batch_rows: int
    device: str
    queue_seconds: float
    compute_seconds: float


@dataclass(slots=True)
class Batch:
    requests: list[QueuedRequest]
    rows: int
    instance: int = 0
    batch_id: int = 0
    marks: list[float] = field(default_factory=list)  # start, inputs gathered, runtime returned, outputs split
    traced: tuple = ()  # its traced requests' span contexts


def split_outputs(batch: Batch, outputs: Feeds, label: str) -> list[Feeds]:
    """Each request's own rows of the batch's outputs, by row offsets."""
    if len(batch.requests) == 1:
        item = batch.requests[0]
        return [{name: outputs[name] for name in item.outputs}]
    for name, value in outputs.items():
        shape = shape_of(value)
        if not shape or shape[0] != batch.rows:
            raise ExecutionFailed(
                f"{label}: output '{name}' has shape {list(shape)}; "
                f"its first dimension should be the batch size {batch.rows}"
            )
    results, offset = [], 0
    for item in batch.requests:
        end = offset + item.rows
        results.append({name: rows_of(outputs[name], offset, end) for name in item.outputs})
        offset = end
    return results


def concatenate(requests: list[QueuedRequest]) -> Feeds:
    """The batch's inputs; a sequence's state left on the device is gathered there (device_state.py)."""
    if len(requests) == 1:
        feeds = requests[0].feeds
        if not any(isinstance(value, DeviceRows) for value in feeds.values()):
            return feeds
    return {name: gather([item.feeds[name] for item in requests]) for name in requests[0].feeds}


def union_outputs(requests: list[QueuedRequest]) -> list[str]:
    names: dict[str, None] = {}
    for item in requests:
        names.update(dict.fromkeys(item.outputs))
    return list(names)


def executed_event(batch: Batch, model: str, version: str, device: str) -> BatchExecuted:
    """What observers hear of a batch that ran (or failed), its phases timed from its marks."""
    marks = batch.marks
    succeeded = len(marks) == 4
    finished = marks[-1] if succeeded else time.perf_counter()
    ends = (marks[1:] + [finished] * 3)[:3]  # a failure leaves the rest of the time in its phase
    return BatchExecuted(
        model=model,
        version=version,
        batch_id=batch.batch_id,
        device=device,
        rows=batch.rows,
        requests=len(batch.requests),
        instance=batch.instance,
        started=marks[0],
        finished=finished,
        succeeded=succeeded,
        input_seconds=ends[0] - marks[0],
        infer_seconds=ends[1] - ends[0],
        output_seconds=ends[2] - ends[1],
        queue_seconds=tuple(item.taken - item.arrival for item in batch.requests),
        traced=batch.traced,
    )


def run_outcome(done: asyncio.Future) -> tuple[Feeds | None, BaseException | None]:
    if done.cancelled():
        return None, ExecutionFailed("the batch's execution was cancelled")
    error = done.exception()
    return (None, error) if error is not None else (done.result(), None)


def run_after(item: QueuedRequest, outputs: Feeds | None) -> None:
    """The request's own hook (a sequence keeps its state), before its caller sees the answer."""
    try:
        item.after(outputs)
    except Exception:  # noqa: BLE001 - one request's bookkeeping must not fail its batch's other callers
        log.exception("request of batch %d: its completion hook failed", item.batch_id)


def resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
