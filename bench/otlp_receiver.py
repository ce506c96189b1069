"""A real OTLP trace receiver for tests, built from the opentelemetry-proto messages and services: a test sees what
the SDK's exporters send a collector, over gRPC TraceService/Export or OTLP/HTTP POST /v1/traces (protobuf)."""

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

PROTOCOLS = ("grpc", "http", "http/protobuf")  # "http/protobuf" as OTEL_EXPORTER_OTLP_PROTOCOL spells it


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived; ids are lowercase hex, "" where the span has none."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 1 internal, 2 server, 3 client, ...
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    links: tuple[tuple[str, str], ...]  # (trace_id, span_id) of each link
    status_code: int  # Status.StatusCode: 0 unset, 1 ok, 2 error
    resource: dict[str, object]  # the resource attributes of the batch it came in
    scope: str  # instrumentation scope name


def decode_value(value: AnyValue) -> object:
    """An OTLP AnyValue as the Python value the SDK was given (arrays as lists, kvlists as dicts)."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return [decode_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    return None if which is None else getattr(value, which)  # string, bool, int, double or bytes_value


def decode_attributes(attributes: Iterable[KeyValue]) -> dict[str, object]:
    return {pair.key: decode_value(pair.value) for pair in attributes}


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = decode_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=decode_attributes(span.attributes),
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        status_code=span.status.code,
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP endpoint on 127.0.0.1: gRPC TraceService.Export and HTTP POST /v1/traces.

    `fail` answers every export with an error (gRPC UNAVAILABLE, HTTP 503: both retryable for the SDK),
    as a collector that is down would, and keeps none of its spans; `delay` sleeps that many seconds
    before each answer, as a slow collector would. Exports are counted either way."""

    def __init__(self, protocol: str = "grpc", fail: bool = False, delay: float = 0.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: one of {PROTOCOLS}")
        self.protocol = "grpc" if protocol == "grpc" else "http"
        self.fail = fail
        self.delay = delay
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._exports = 0
        self._port = 0
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> bool:
        """Count one export, sleep `delay`, keep its spans unless failing; False when failing."""
        with self._lock:
            self._exports += 1
        time.sleep(self.delay)
        if not self.fail:
            spans = decode_request(request)
            with self._lock:
                self._spans.extend(spans)
        return not self.fail

    def Export(self, request, context) -> trace_service_pb2.ExportTraceServiceResponse:  # the gRPC method
        if not self._receive(request):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the test's collector is down")
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> "OtlpReceiver":
        """Listen on a free loopback port; returns self."""
        if self.protocol == "grpc":
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._grpc)
            self._port = self._grpc.add_insecure_port("127.0.0.1:0")
            self._grpc.start()
        else:
            self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
            self._port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, args=(0.05,), name="otlp-http", daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT should be, for either protocol: the SDK's HTTP exporter
        appends /v1/traces to it, and its gRPC exporter takes an http:// endpoint as insecure."""
        return f"http://127.0.0.1:{self._port}"

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def exports(self) -> int:
        """Export calls received, failed ones included."""
        with self._lock:
            return self._exports

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0) -> list[ReceivedSpan]:
        """The spans once `predicate(spans)` holds: batch processors export on their own schedule."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = [(span.name, span.span_id, span.parent_span_id) for span in spans]
                raise AssertionError(f"after {timeout}s, {self.exports()} exports brought {len(spans)} spans: {names}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(5)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """OTLP/HTTP with binary protobuf only (the SDK's http exporter sends no JSON); 404 on another
        path, so an exporter given the base URL as its endpoint= argument (used verbatim) shows."""

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v1/traces":
                return self.send_error(404, "OTLP traces are POSTed to /v1/traces")
            if self.headers.get_content_type() != "application/x-protobuf":
                return self.send_error(415, "application/x-protobuf only")
            encoding = self.headers.get("Content-Encoding", "").lower()
            if encoding in ("gzip", "deflate"):  # OTEL_EXPORTER_OTLP_COMPRESSION
                body = gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body)
            if not receiver._receive(trace_service_pb2.ExportTraceServiceRequest.FromString(body)):
                return self.send_error(503, "the test's collector is down")
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows stderr on failure
            pass

    return Handler
