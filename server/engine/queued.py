"""What waits in a batcher's queue and what it runs: a queued request, a batch, a caller's answer,
and the row arithmetic between them (gathering requests into one batch, splitting its outputs)."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.errors import ExecutionFailed

Feeds = dict[str, np.ndarray]


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


def split_outputs(batch: Batch, outputs: Feeds, label: str) -> list[Feeds]:
    """Each request's own rows of the batch's outputs, by row offsets."""
    if len(batch.requests) == 1:
        item = batch.requests[0]
        return [{name: outputs[name] for name in item.outputs}]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != batch.rows:
            raise ExecutionFailed(
                f"{label}: output '{name}' has shape {list(array.shape)}; "
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
