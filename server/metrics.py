"""Prometheus observer of the data path's events, on an injected registry,
and the /metrics HTTP endpoint."""

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from server.events import BatchExecuted, ModelStateChanged, QueueDepthChanged, RequestFinished

MODEL_LABELS = ("model", "version")


class MetricsObserver:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "onnxserve_requests", "ModelInfer calls by outcome", (*MODEL_LABELS, "outcome"), registry=registry
        )
        self.inferences = Counter(
            "onnxserve_inferences", "Rows served (a request of N rows counts N)", MODEL_LABELS, registry=registry
        )
        self.batches = Counter("onnxserve_batches", "Model executions", MODEL_LABELS, registry=registry)
        self.queue_depth = Gauge("onnxserve_queue_depth", "Requests waiting", MODEL_LABELS, registry=registry)
        self.model_ready = Gauge(
            "onnxserve_model_ready",
            "1 when the model version serves; provider is the execution provider actually in use",
            (*MODEL_LABELS, "provider"),
            registry=registry,
        )

    def observe(self, event: object) -> None:
        if isinstance(event, BatchExecuted):
            if event.succeeded:
                self.inferences.labels(event.model, event.version).inc(event.rows)
                self.batches.labels(event.model, event.version).inc()
        elif isinstance(event, RequestFinished):
            self.requests.labels(event.model, event.version, event.outcome).inc()
        elif isinstance(event, QueueDepthChanged):
            self.queue_depth.labels(event.model, event.version).set(event.depth)
        elif isinstance(event, ModelStateChanged):
            self.model_ready.labels(event.model, event.version, event.provider).set(1 if event.ready else 0)


def serve_metrics(registry: CollectorRegistry, address: str, port: int) -> WSGIServer:
    """Start /metrics in a daemon thread; the returned server knows its bound port."""
    httpd, _thread = start_http_server(port, addr=address, registry=registry)
    return httpd
