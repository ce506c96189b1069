"""Events published by the data path, and the bus that delivers them.

Observers (metrics, costs) subscribe; the path never waits on them and never
sees their failures: a failing observer is logged, not raised.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


PHASES = ("input", "infer", "output")  # of a batch execution; see BatchExecuted
REQUEST_OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "error", "refused")


@dataclass(frozen=True, slots=True)
class BatchStarted:
    """A batch began on one instance; the cost ledger starts splitting its device's time."""

    model: str
    version: str
    batch_id: int
    device: str  # "cpu" or "cuda:N": where the instance runs
    started: float  # perf_counter() seconds
    tenants: tuple[tuple[str, int], ...] = ()  # (tenant's /metrics name, its rows in the batch)


@dataclass(frozen=True, slots=True)
class BatchExecuted:
    """One model execution finished (successfully or not), with its phases timed.

    input: gathering the requests' tensors into one batch; infer: the runtime call,
    thread hop included; output: splitting the outputs into each caller's rows.
    """

    model: str
    version: str
    batch_id: int
    device: str
    rows: int
    requests: int
    instance: int
    started: float  # perf_counter() seconds
    finished: float
    succeeded: bool
    input_seconds: float = 0.0
    infer_seconds: float = 0.0
    output_seconds: float = 0.0
    queue_seconds: tuple[float, ...] = ()  # one per request: arrival to the batch's start
    traced: tuple = ()  # the span contexts of its traced requests (server/observe/tracing.py)


@dataclass(frozen=True, slots=True)
class RequestStarted:
    """A ModelInfer call for a known model version was received."""

    model: str
    version: str


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """One ModelInfer call was answered; outcome is ok, invalid, rejected, timeout, cancelled or error."""

    model: str
    version: str
    outcome: str
    rows: int
    duration_seconds: float
    protocol: str = "grpc"  # the transport it came by: grpc or http
    tenant: str = "unknown"  # the tenant's name on /metrics ("other" once folded)
    trace_id: str = ""  # where the request was traced: its latency's exemplar


@dataclass(frozen=True, slots=True)
class ModelStateChanged:
    """A model version became ready or unavailable; provider is the one actually in use."""

    model: str
    version: str
    ready: bool
    provider: str
    reason: str = ""
    queue_capacity: int = 0  # max_queue_size; 0 = unbounded
    devices: tuple[str, ...] = ()  # where its instances run
    queue_depth: Callable[[], int] | None = None  # requests waiting now, read at scrape time
    load_seconds: float = 0.0  # from reading the file to ready: sessions, calibration, warm-up


@dataclass(frozen=True, slots=True)
class SequenceChanged:
    """A sequence of a sequence-batched model started (took a slot), began to wait for one (waiting),
    or ended: by its END request (ended), idle past max_sequence_idle_microseconds (timed_out), or
    with its version (aborted). live and waiting: the model's sequences after the change."""

    model: str
    version: str
    change: str
    live: int
    waiting: int


@dataclass(frozen=True, slots=True)
class RepositoryChanged:
    """A load or unload of a model ended, successfully or not: readiness may have changed."""

    model: str


Observer = Callable[[object], None]


class EventBus:
    """Delivers each event to the observers of its type (or of every type), in order.

    An observer subscribed with `deferred=True` gets its events at the end of the current event-loop
    turn instead, after the callers the data path has just answered: counting and histograms then
    cost a caller no latency. The cost ledger stays immediate, as responses read their batch's cost."""

    def __init__(self) -> None:
        self._subscriptions: list[tuple[Observer, tuple[type, ...], bool]] = []
        self._routes: dict[type, tuple[tuple[Observer, ...], tuple[Observer, ...]]] = {}
        self._pending: list[tuple[tuple[Observer, ...], object]] = []  # this loop turn's deferred events

    def subscribe(self, observer: Observer, *event_types: type, deferred: bool = False) -> None:
        """`observer` gets the events of `event_types`, or every event when none are named."""
        self._subscriptions.append((observer, event_types, deferred))
        self._routes.clear()

    def _route(self, event_type: type) -> tuple[tuple[Observer, ...], tuple[Observer, ...]]:
        chosen = [
            (observer, deferred)
            for observer, types, deferred in self._subscriptions
            if not types or event_type in types
        ]
        route = tuple(o for o, d in chosen if not d), tuple(o for o, d in chosen if d)
        self._routes[event_type] = route
        return route

    def publish(self, event: object) -> None:
        now, later = self._routes.get(type(event)) or self._route(type(event))
        for observer in now:
            _deliver(observer, event)
        if not later:
            return
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:  # no event loop (a tool, a test): deliver at once
                for observer in later:
                    _deliver(observer, event)
                return
        self._pending.append((later, event))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for observers, event in pending:
            for observer in observers:
                _deliver(observer, event)


def _deliver(observer: Observer, event: object) -> None:
    try:
        observer(event)
    except Exception:  # an observer must never break the data path
        log.exception("event observer %r failed on %r", observer, event)
