"""OpenTelemetry traces of requests and of the batches that ran them (on only where trace_config.py
finds an exporter endpoint; this module imports the SDK, so only then is it imported).

A request is traced when its client's traceparent says sampled, or, without one, by its model's
rate. Its spans are written when it ends, from the times the data path keeps anyway: `infer MODEL`
(SERVER: model, version, protocol, tenant, rows, outcome, cost), with children `decode` (receipt
to the queue), `queue` (to its batch's start), `compute` (its batch's run, linked to the batch) and
`encode` (to its end). A batch that carried a traced request is a span of its own, `batch MODEL`
(batch id, rows, requests, instance, device, provider, compute time, cost), linked to each traced
request in it: a trace viewer shows who rode with whom. Export runs in a thread of its own, in
batches, from a bounded buffer: a full buffer, or an export that fails, drops spans and counts them
(onnxserve_trace_spans_dropped_total); a request never waits on it."""

import asyncio
import collections
import logging
import random
import threading
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

from server.observe.events import BatchExecuted, ModelStateChanged
from server.observe.log_format import request_trace
from server.observe.trace_config import GRPC, TraceConfig
from server.observe.trace_settings import TraceSettings

log = logging.getLogger(__name__)

BUFFER_SPANS = 8192  # spans waiting for export; past it, new ones are dropped and counted
EXPORT_SPANS = 512  # spans per export call
EXPORT_EVERY = 1.0  # seconds between exports when fewer than EXPORT_SPANS wait
BATCHES_KEPT = 4096  # recent batches' span contexts, for their requests' `compute` links
# perf_counter() and loop.time() (monotonic) to the epoch nanoseconds spans take
PERF_TO_EPOCH = time.time_ns() - time.perf_counter_ns()
MONOTONIC_TO_EPOCH = time.time_ns() - time.monotonic_ns()
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET, SERVER, INTERNAL = Status(StatusCode.UNSET), SpanKind.SERVER, SpanKind.INTERNAL


def _perf_ns(seconds: float) -> int:
    return int(seconds * 1e9) + PERF_TO_EPOCH


def _monotonic_ns(seconds: float) -> int:
    return int(seconds * 1e9) + MONOTONIC_TO_EPOCH


class BoundedExport(SpanProcessor):
    """Ended spans into a bounded buffer; a daemon thread exports them in batches."""

    def __init__(self, exporter: SpanExporter, dropped: Counter) -> None:
        self.exporter, self.dropped = exporter, dropped
        self.buffer: collections.deque[ReadableSpan] = collections.deque()
        self.wake, self.stopping = threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="trace-export", daemon=True)
        self.thread.start()

    def on_start(self, span, parent_context=None) -> None:
        return

    def on_end(self, span: ReadableSpan) -> None:
        if len(self.buffer) >= BUFFER_SPANS:
            self.dropped.inc()
            return
        self.buffer.append(span)
        if len(self.buffer) >= EXPORT_SPANS:
            self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(EXPORT_EVERY)
            self.wake.clear()
            self._export_all()

    def _export_all(self) -> None:
        while self.buffer:
            batch = [self.buffer.popleft() for _ in range(min(EXPORT_SPANS, len(self.buffer)))]
            try:
                result = self.exporter.export(batch)
            except Exception as err:  # noqa: BLE001 - a collector's failure is counted, never raised
                log.warning("exporting %d spans failed: %s", len(batch), err)
                result = SpanExportResult.FAILURE
            if result is not SpanExportResult.SUCCESS:
                self.dropped.inc(len(batch))

    def shutdown(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(5)
        self._export_all()
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._export_all()
        return True


def exporter_of(config: TraceConfig) -> SpanExporter:
    """OTLP over gRPC or HTTP/protobuf; the rest (headers, timeout, TLS) from OpenTelemetry's variables."""
    if config.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT itself
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint_is_url else OTLPSpanExporter()


@dataclass(slots=True)
class RequestSpan:
    """A traced request's span while it runs: its ids, its parent (a client's, or none), and its trace
    id in hex, as the response, the exemplar and the logs carry it."""

    context: trace.SpanContext
    parent: trace.SpanContext | None
    trace_id: str


class Tracing:
    """Sampling, the spans of requests and batches, and their export.

    Spans are written whole, once their times are known, as the SDK's finished spans (ReadableSpan)
    handed to the export processor: a request's five spans cost a fifth of what the SDK's tracer
    takes to start and end them (locks, limits, a sampler that would only agree with ours)."""

    def __init__(self, config: TraceConfig, registry: CollectorRegistry, batch_cost=None) -> None:
        self.config, self.settings, self.batch_cost = config, TraceSettings(config), batch_cost
        self.dropped = Counter(
            "onnxserve_trace_spans_dropped", "Spans not exported: buffer full or export failed", registry=registry
        )
        resource = Resource.create(dict(config.resource))  # with OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "onnxserve"}))
        self.resource, self.scope, self.ids = resource, InstrumentationScope("onnxserve"), RandomIdGenerator()
        self.processor = BoundedExport(exporter_of(config), self.dropped)
        self.propagator = TraceContextTextMapPropagator()
        self.batches: collections.OrderedDict[int, trace.SpanContext] = collections.OrderedDict()
        self.providers: dict[tuple[str, str], str] = {}  # (model, version) -> the execution provider in use
        log.info("tracing: OTLP %s to %s (%s), %s", config.protocol, config.endpoint, config.where, self.settings)

    def handlers(self) -> dict[type, object]:
        return {BatchExecuted: self.batch, ModelStateChanged: self._provider}

    def begin(self, call, traceparent: str | None, tracestate: str | None = None) -> None:
        """At resolve: whether the request is traced; if it is, call.span, and the request's task logs
        with its ids (a stream's task serves one request after another: reset each)."""
        if request_trace.get() is not None:
            request_trace.set(None)
        parent = self._parent(traceparent, tracestate) if traceparent else None
        if parent is not None and not parent.trace_flags.sampled:
            return
        name = call.model.name
        if not self.settings.on(name):
            return
        if parent is None and not self.settings.sampled(name, random.random()):
            return
        trace_id = parent.trace_id if parent is not None else self.ids.generate_trace_id()
        state = parent.trace_state if parent is not None else None
        context = trace.SpanContext(trace_id, self.ids.generate_span_id(), False, SAMPLED, state)
        call.span = RequestSpan(context, parent, format(trace_id, "032x"))
        if asyncio.current_task() is not None:  # not in a callback (the link's engine end): its context outlives it
            request_trace.set((call.span.trace_id, format(context.span_id, "016x")))

    def _parent(self, traceparent: str, tracestate: str | None) -> trace.SpanContext | None:
        """The client's span, where its traceparent is valid."""
        carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
        parent = trace.get_current_span(self.propagator.extract(carrier)).get_span_context()
        return parent if parent.is_valid else None

    def end(self, call, outcome: str, share) -> None:
        """The request ended: its span and its children, written from the times the path kept."""
        started, item = call.span, call.item
        now = time.time_ns()
        status = Status(StatusCode.ERROR, outcome) if outcome != "ok" else UNSET
        attributes = self._request_attributes(call, outcome, share)
        name = f"infer {call.model.name}"
        self._write(name, started.context, started.parent, _perf_ns(call.started), now, attributes, SERVER, status)
        if item is not None and item.taken:
            self._children(started.context, call, item, call.answer, now)
        log.debug("%s: request %r ended %s", call.model.label, call.request_id, outcome)  # with its trace's ids

    def _children(self, parent: trace.SpanContext, call, item, answer, now: int) -> None:
        arrival, taken = _monotonic_ns(item.arrival), _monotonic_ns(item.taken)
        self._child("decode", parent, _perf_ns(call.started), arrival)
        self._child("queue", parent, arrival, taken)
        if answer is None:
            return
        computed = taken + int(answer.compute_seconds * 1e9)
        batch = self.batches.get(answer.batch_id)
        links = (Link(batch),) if batch is not None else ()
        self._child("compute", parent, taken, computed, links, {"onnxserve.batch_id": answer.batch_id})
        self._child("encode", parent, computed, max(now, computed))

    def _child(self, name: str, parent: trace.SpanContext, start: int, end: int, links=(), attributes=None) -> None:
        context = trace.SpanContext(parent.trace_id, self.ids.generate_span_id(), False, SAMPLED, parent.trace_state)
        self._write(name, context, parent, start, max(start, end), attributes, links=links)

    def _write(self, name, context, parent, start, end, attributes, kind=INTERNAL, status=UNSET, links=()) -> None:
        span = ReadableSpan(
            name,
            context,
            parent,
            self.resource,
            attributes,
            links=links,
            kind=kind,
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def _request_attributes(self, call, outcome: str, share) -> dict:
        model, identity = call.model, call.identity
        attributes = {
            "onnxserve.model": model.name,
            "onnxserve.version": model.version,
            "onnxserve.protocol": call.protocol,
            "onnxserve.tenant": identity.tenant,
            "onnxserve.rows": call.rows,
            "onnxserve.outcome": outcome,
        }
        if call.request_id:
            attributes["onnxserve.request_id"] = call.request_id
        if share is not None:
            attributes.update({"onnxserve.cost_dollars": share.dollars, "onnxserve.device": share.device})
            if share.joules is not None:
                attributes["onnxserve.energy_joules"] = share.joules
        if call.answer is not None:
            attributes["onnxserve.batch_id"] = call.answer.batch_id
        return attributes

    def batch(self, event: BatchExecuted) -> None:
        """A batch ran: a span of its own if it carried a traced request, linked to each."""
        if not event.traced:
            return
        dollars = self.batch_cost(event.batch_id, event.rows) if self.batch_cost is not None else None
        attributes = {
            "onnxserve.model": event.model,
            "onnxserve.version": event.version,
            "onnxserve.batch_id": event.batch_id,
            "onnxserve.rows": event.rows,
            "onnxserve.requests": event.requests,
            "onnxserve.instance": event.instance,
            "onnxserve.device": event.device,
            "onnxserve.provider": self.providers.get((event.model, event.version), ""),
            "onnxserve.compute_seconds": event.finished - event.started,
            "onnxserve.succeeded": event.succeeded,
        }
        if dollars is not None:
            attributes["onnxserve.batch_cost_dollars"] = dollars
        context = trace.SpanContext(self.ids.generate_trace_id(), self.ids.generate_span_id(), False, SAMPLED)
        links = tuple(Link(request) for request in event.traced)
        start, end = _perf_ns(event.started), _perf_ns(event.finished)
        self._write(f"batch {event.model}", context, None, start, end, attributes, links=links)
        self.batches[event.batch_id] = context
        while len(self.batches) > BATCHES_KEPT:
            self.batches.popitem(last=False)

    def _provider(self, event: ModelStateChanged) -> None:
        if event.ready:
            self.providers[(event.model, event.version)] = event.provider

    def close(self) -> None:
        """Export what is buffered (a few seconds at most) and stop."""
        self.processor.shutdown()
