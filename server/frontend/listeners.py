"""The REST and /metrics listeners' bounds (--http-max-header-bytes, ...), and each listener's
open connections and their metrics; server/frontend/connection_limits.py enforces them per connection."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from server.config import ServerSettings

if TYPE_CHECKING:
    from server.frontend.connection_limits import LimitedHttpToolsProtocol

LISTENERS = ("http", "metrics")
DROP_REASONS = ("timeout", "headers_too_large", "url_too_long")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """One HTTP listener's bounds, from ServerSettings (--http-max-header-bytes, ...)."""

    max_header_bytes: int  # request line and headers together
    max_url_bytes: int  # path and query
    header_timeout: float  # from the connection's start, or a kept-alive request's first byte
    body_timeout: float  # from the end of the headers, plus a second per MiB received
    max_connections: int


def http_limits(settings: ServerSettings, listener: str) -> HttpLimits:
    """REST's limits (listener "http") or /metrics' (a GET: its body limit never applies)."""
    if listener == "metrics":
        timeout = settings.metrics_header_timeout_secs
        return HttpLimits(
            settings.http_max_header_bytes,
            settings.http_max_url_bytes,
            timeout,
            timeout,
            settings.metrics_max_connections,
        )
    return HttpLimits(
        settings.http_max_header_bytes,
        settings.http_max_url_bytes,
        settings.http_header_timeout_secs,
        settings.http_body_timeout_secs,
        settings.http_max_connections,
    )


class ConnectionMetrics:
    """Open, refused and dropped connections of the HTTP listeners, on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "onnxserve_connections_open",
            "Open connections, TLS handshakes included",
            ("listener",),
            registry=registry,
            multiprocess_mode="livesum",  # in front-end processes: the sum over those running
        )
        self.refused = Counter(
            "onnxserve_connections_refused",
            "Connections closed at once: the listener had its most open (--http-max-connections, --metrics-max-connections)",
            ("listener",),
            registry=registry,
        )
        self.dropped = Counter(
            "onnxserve_connections_dropped",
            "Connections closed before their request was complete: timeout, headers_too_large (431), url_too_long (414)",
            ("listener", "reason"),
            registry=registry,
        )
        for listener in LISTENERS:  # series exist at 0, so that rate() sees the first one
            self.open.labels(listener)
            self.refused.labels(listener)
            for reason in DROP_REASONS:
                self.dropped.labels(listener, reason)


class Listener:
    """One listener's limits and open connections. Used only from the thread of its event loop.

    A full listener makes room by closing the connection kept alive without a request the longest,
    if there is one: else a client that made one request and keeps its connection (75 s) would
    hold a place that new clients need."""

    def __init__(self, name: str, limits: HttpLimits, metrics: ConnectionMetrics | None = None) -> None:
        metrics = metrics if metrics is not None else ConnectionMetrics(CollectorRegistry())
        self.name, self.limits, self.open = name, limits, 0
        self._idle: dict[LimitedHttpToolsProtocol, None] = {}  # kept alive between requests, longest first
        self._open = metrics.open.labels(name)
        self._refused = metrics.refused.labels(name)
        self._dropped = {reason: metrics.dropped.labels(name, reason) for reason in DROP_REASONS}

    def admit(self) -> bool:
        if self.open >= self.limits.max_connections and self._idle:
            oldest = next(iter(self._idle))
            self.working(oldest)
            oldest.make_room()
        if self.open >= self.limits.max_connections:
            self._refused.inc()
            return False
        self.open += 1
        self._open.set(self.open)
        return True

    def resting(self, connection: "LimitedHttpToolsProtocol") -> None:
        self._idle[connection] = None

    def working(self, connection: "LimitedHttpToolsProtocol") -> None:
        self._idle.pop(connection, None)

    def release(self) -> None:
        self.open -= 1
        self._open.set(self.open)

    def dropped(self, reason: str) -> None:
        self._dropped[reason].inc()
