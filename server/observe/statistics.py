"""Cumulative per-version counts and durations, in the shape of Triton's
ModelStatistics: an observer of the data path's events, read by the service."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.observe.events import PHASES, BatchExecuted, RequestFinished


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count


@dataclass(slots=True)
class VersionStatistics:
    """Triton's semantics: compute and queue durations are per request (a request in a
    batch is charged the batch's compute time); batch_stats are per execution."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows answered
    execution_count: int = 0  # successful batches
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: dict[str, Duration] = field(default_factory=lambda: {phase: Duration() for phase in PHASES})
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)


class StatisticsRecorder:
    """Runs on the event loop, like the service that reads it, so it needs no lock."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def get(self, model: str, version: str) -> VersionStatistics:
        """The version's figures so far (all zero before its first request)."""
        return self._versions.get((model, version)) or VersionStatistics()

    def _entry(self, model: str, version: str) -> VersionStatistics:
        return self._versions.setdefault((model, version), VersionStatistics())

    def observe(self, event: object) -> None:
        if isinstance(event, RequestFinished):
            self._request(event)
        elif isinstance(event, BatchExecuted) and event.succeeded:
            self._batch(event)

    def _request(self, event: RequestFinished) -> None:
        stats = self._entry(event.model, event.version)
        if event.outcome == "ok":
            stats.success.add(event.duration_seconds)
            stats.last_inference_ms = int(self._wall_clock() * 1000)
        else:
            stats.fail.add(event.duration_seconds)

    def _batch(self, event: BatchExecuted) -> None:
        stats = self._entry(event.model, event.version)
        stats.inference_count += event.rows
        stats.execution_count += 1
        phases = dict(zip(PHASES, (event.input_seconds, event.infer_seconds, event.output_seconds)))
        per_size = stats.batches.setdefault(event.rows, {phase: Duration() for phase in PHASES})
        for phase, seconds in phases.items():
            stats.compute[phase].add(seconds, event.requests)
            per_size[phase].add(seconds)
        for seconds in event.queue_seconds:
            stats.queue.add(seconds)
