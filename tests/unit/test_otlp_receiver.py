"""The OTLP receiver gets what the real OpenTelemetry SDK exporters send, over gRPC and OTLP/HTTP.

The exporters are configured as the server process will be, from OTEL_EXPORTER_OTLP_ENDPOINT; providers
are local to each test (never trace.set_tracer_provider, which would leak into other tests)."""

import time

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from bench.otlp_receiver import OtlpReceiver

PROTOCOLS = ["grpc", "http/protobuf"]
SERVER, INTERNAL = 2, 1  # opentelemetry.proto.trace.v1.Span.SpanKind


@pytest.fixture
def otlp_env(monkeypatch):
    """Only what a test sets: none of the OTEL_ variables of the shell running pytest."""
    for name in (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_SERVICE_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def exporter(protocol: str, receiver: OtlpReceiver, monkeypatch, **options) -> SpanExporter:
    """The SDK's exporter for `protocol`, pointed at the receiver by OTEL_EXPORTER_OTLP_ENDPOINT alone."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    return GrpcExporter(**options) if protocol == "grpc" else HttpExporter(**options)


def hex_id(value: int, digits: int = 16) -> str:
    return format(value, f"0{digits}x")


@pytest.mark.parametrize("processor", [SimpleSpanProcessor, BatchSpanProcessor])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_receiver_gets_spans_with_parents_links_attributes_and_resource(protocol, processor, otlp_env):
    with OtlpReceiver(protocol) as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "onnxserve-test"}))
        provider.add_span_processor(processor(exporter(protocol, receiver, otlp_env)))
        tracer = provider.get_tracer("tests.otlp")
        linked = tracer.start_span("linked")
        linked.end()
        attributes = {"model": "resnet", "batch": 8, "seconds": 0.25, "gpu": True, "shape": [1, 3, 224, 224]}
        with tracer.start_as_current_span("parent", kind=SpanKind.SERVER, attributes=attributes) as parent:
            with tracer.start_as_current_span("child", links=[Link(linked.get_span_context())]) as child:
                child.set_attribute("outputs", ["logits", "probs"])
                child.set_status(Status(StatusCode.ERROR, "failed"))
        assert provider.force_flush(5000)
        provider.shutdown()

        spans = {span.name: span for span in receiver.wait_for(lambda spans: len(spans) == 3, timeout=5)}
        assert sorted(spans) == ["child", "linked", "parent"]
        assert receiver.exports() == (3 if processor is SimpleSpanProcessor else 1)  # one span each, or one batch
        trace_id = hex_id(parent.get_span_context().trace_id, 32)
        assert spans["parent"].trace_id == spans["child"].trace_id == trace_id
        assert spans["parent"].span_id == hex_id(parent.get_span_context().span_id)
        assert spans["parent"].parent_span_id == "" and spans["linked"].parent_span_id == ""
        assert spans["child"].parent_span_id == spans["parent"].span_id
        assert spans["child"].links == ((spans["linked"].trace_id, spans["linked"].span_id),)
        assert spans["linked"].trace_id != trace_id and spans["parent"].links == ()
        assert spans["parent"].attributes == attributes
        assert spans["child"].attributes == {"outputs": ["logits", "probs"]}
        assert (spans["parent"].kind, spans["child"].kind) == (SERVER, INTERNAL)
        assert (spans["parent"].status_code, spans["child"].status_code) == (0, 2)  # unset, error
        assert spans["parent"].start_ns <= spans["child"].start_ns <= spans["child"].end_ns <= spans["parent"].end_ns
        for span in spans.values():
            assert span.resource["service.name"] == "onnxserve-test"
            assert span.resource["telemetry.sdk.name"] == "opentelemetry"
            assert span.scope == "tests.otlp"


def finished_span():
    """One ended SDK span, to hand an exporter directly."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.get_tracer("tests.otlp").start_span("lost").end()
    return memory.get_finished_spans()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_collector_that_is_down_fails_the_export_after_counted_attempts(protocol, otlp_env):
    with OtlpReceiver(protocol, fail=True) as receiver:
        # Both exporters retry UNAVAILABLE / 503 after a backoff of at least 0.8 s, and give up when the
        # backoff passes their timeout: with 0.7 s, exactly one attempt.
        sdk_exporter = exporter(protocol, receiver, otlp_env, timeout=0.7)
        assert sdk_exporter.export(finished_span()) is SpanExportResult.FAILURE
        sdk_exporter.shutdown()
        assert receiver.exports() == 1 and receiver.spans() == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_slow_collector_answers_after_its_delay(protocol, otlp_env):
    with OtlpReceiver(protocol, delay=0.3) as receiver:
        sdk_exporter = exporter(protocol, receiver, otlp_env, timeout=5)
        started = time.monotonic()
        assert sdk_exporter.export(finished_span()) is SpanExportResult.SUCCESS
        assert time.monotonic() - started >= 0.3
        sdk_exporter.shutdown()
        assert [span.name for span in receiver.spans()] == ["lost"]


def test_the_http_exporter_takes_an_endpoint_argument_verbatim(otlp_env):
    """OTEL_EXPORTER_OTLP_ENDPOINT gets /v1/traces appended; endpoint= does not: the receiver says 404."""
    with OtlpReceiver("http") as receiver:
        sdk_exporter = HttpExporter(endpoint=receiver.endpoint, timeout=2)
        assert sdk_exporter.export(finished_span()) is SpanExportResult.FAILURE
        sdk_exporter.shutdown()
        assert receiver.exports() == 0
