"""Events published by the data path, and the bus that delivers them.

Observers (metrics, costs) subscribe; the path never waits on them and never
sees their failures: a failing observer is logged, not raised.
"""

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchExecuted:
    """One model execution finished (successfully or not)."""

    model: str
    version: str
    rows: int
    requests: int
    instance: int
    started: float  # perf_counter() seconds
    finished: float
    succeeded: bool


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """One ModelInfer call was answered; outcome is ok, invalid, rejected, timeout, cancelled or error."""

    model: str
    version: str
    outcome: str
    rows: int
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class ModelStateChanged:
    """A model version became ready or unavailable; provider is the one actually in use."""

    model: str
    version: str
    ready: bool
    provider: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueueDepthChanged:
    model: str
    version: str
    depth: int


Observer = Callable[[object], None]


class EventBus:
    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def subscribe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def publish(self, event: object) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer must never break the data path
                log.exception("event observer %r failed on %r", observer, event)
