"""Sequences of sequence-batched models on /metrics: how many are live and waiting for a slot now,
and how many started and ended, by how they ended. Moved only by SequenceChanged events."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from server.observe.events import SequenceChanged

MODEL_LABELS = ("model", "version")
CHANGES = ("started", "waiting", "ended", "timed_out", "aborted")


class SequenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.changes = Counter(
            "onnxserve_sequences",
            "Sequences by change: started (took a slot), waiting (for a slot), ended (its END ran), "
            "timed_out (idle past max_sequence_idle_microseconds), aborted (its version went)",
            (*MODEL_LABELS, "change"),
            registry=registry,
        )
        self.live = Gauge("onnxserve_sequences_live", "Sequences holding a slot", MODEL_LABELS, registry=registry)
        self.waiting = Gauge(
            "onnxserve_sequences_waiting", "Sequences waiting for a slot", MODEL_LABELS, registry=registry
        )

    def handlers(self) -> dict[type, Callable]:
        return {SequenceChanged: self._changed}

    def _changed(self, event: SequenceChanged) -> None:
        labels = (event.model, event.version)
        self.changes.labels(*labels, event.change).inc()
        self.live.labels(*labels).set(event.live)
        self.waiting.labels(*labels).set(event.waiting)
