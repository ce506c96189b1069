"""What one connection may cost the server, on each of its three listeners.

REST and /metrics run uvicorn's httptools protocol, which bounds nothing before a request's headers
are complete: httptools joins the pieces of a header value by bytes concatenation and uvicorn joins
the URL's the same way, so their cost grows with the square of the size (one 256 MiB header: 85 s of
CPU), and uvicorn's keep-alive timer starts only after a response, so a connection that never
completes a request stays open for good. LimitedHttpToolsProtocol counts a request's head bytes
before the parser sees them and its URL as parsed, and answers 431 or 414 past the limit without
reading on (what the client still sends is dropped unparsed, then the connection closes); closes a
connection whose request does not arrive in time, TLS handshake included (the listening socket is
plain and each connection starts its own TLS, so that a handshake counts like any other wait); and
refuses connections beyond a cap per listener. Listener keeps the count and the metrics.

gRPC: grpc core bounds metadata (16 KiB, RESOURCE_EXHAUSTED past it) and ping floods (GOAWAY) by
default, but neither connections, idle connections, calls per connection, nor the wait for a new
connection's HTTP/2 preface (120 s): grpc_options() sets those.
"""

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from functools import partial

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.config import ServerSettings

log = logging.getLogger(__name__)

LISTENERS = ("http", "metrics")
DROP_REASONS = ("timeout", "headers_too_large", "url_too_long")
# A body may take its timeout plus one second per MiB received: a big upload on a slow link still
# finishes, a trickle of a few bytes a second does not hold the connection for long.
BODY_BYTES_PER_SECOND = 1 << 20
# After a refusal, what the client still sends is read and dropped (never parsed nor kept) this long,
# so that a client busy writing its request reads the answer instead of a connection reset.
LINGER_SECONDS = 1.0
FILES_IN_RESERVE = 256  # model files, logs, grpc's own pipes and the like, besides the connections
SERVICE_UNAVAILABLE = STATUS_LINE[503] + b"content-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """One HTTP listener's bounds; the defaults are ServerSettings' (--http-max-header-bytes, ...)."""

    max_header_bytes: int = 64 * 1024  # request line and headers together
    max_url_bytes: int = 8 * 1024  # path and query
    header_timeout: float = 10.0  # from the connection's start, or a kept-alive request's first byte
    body_timeout: float = 30.0  # from the end of the headers, plus a second per MiB received
    max_connections: int = 1000


def http_limits(settings: ServerSettings, listener: str) -> HttpLimits:
    """REST's limits (listener "http") or /metrics' (a GET: its body limit never applies)."""
    if listener == "metrics":
        timeout = settings.metrics_header_timeout_secs
        return HttpLimits(settings.http_max_header_bytes, settings.http_max_url_bytes, timeout, timeout,
                          settings.metrics_max_connections)  # fmt: skip
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
            "onnxserve_connections_open", "Open connections, TLS handshakes included", ("listener",), registry=registry
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
        self._idle: dict["LimitedHttpToolsProtocol", None] = {}  # kept alive between requests, longest first
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


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounds on each request's URL, headers and time, and on
    its listener's open connections. asyncio calls connection_made with the TCP connection; under
    TLS the handshake follows, then connection_ready starts uvicorn's protocol."""

    def __init__(self, config, server_state, app_state, _loop=None, listener: Listener | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.listener = listener if listener is not None else Listener("http", HttpLimits())
        self.limits = self.listener.limits
        self._admitted = False
        self._socket: asyncio.Transport | None = None  # the TCP connection (under TLS, beneath self.transport)
        self._handshake: asyncio.Task | None = None
        self._early: list[bytes] = []  # under TLS, bytes that came with the end of the handshake
        self._timer: asyncio.TimerHandle | None = None
        self._head_left: int | None = self.limits.max_header_bytes  # None: in a body, or answering
        self._started = False  # a byte of the current request arrived
        self._body_since, self._body_bytes = 0.0, 0
        self._refusal: tuple[int, str, str] | None = None  # found by a parser callback: the parser is ignored
        self._answered = False  # refused with a status of our own: what else arrives is dropped

    # --- the connection ------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._socket = transport
        if not self.listener.admit():
            if self.config.ssl is None:  # under TLS a status would need the handshake it saves
                transport.write(SERVICE_UNAVAILABLE)
            transport.close()
            return
        self._admitted = True
        self._arm(self.limits.header_timeout)
        if self.config.ssl is None:
            self.connection_ready(transport)
            return
        transport.pause_reading()  # the TLS layer reads first: the ClientHello is not HTTP
        self._handshake = self.loop.create_task(self._start_tls(transport))

    async def _start_tls(self, transport) -> None:
        secure = None
        try:  # our timer ends a handshake first; asyncio's own is the backstop
            secure = await self.loop.start_tls(
                transport, self, self.config.ssl, server_side=True, ssl_handshake_timeout=2 * self.limits.header_timeout
            )
        except OSError as err:  # ssl.SSLError, a reset, asyncio's timeout: asyncio has closed the socket
            log.debug("%s: TLS handshake failed: %s", self.listener.name, err)
        finally:
            if secure is None:  # failed, or closed meanwhile: this protocol never hears connection_lost
                self._disarm()
                self._release()
        if secure is not None and not secure.is_closing():
            self.connection_ready(secure)

    def connection_ready(self, transport) -> None:
        """The connection carries HTTP now (after the TLS handshake, if any): uvicorn's protocol starts."""
        super().connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.working(self)
        self._disarm()
        self._release()
        if self.transport is not None:  # uvicorn's protocol had started
            super().connection_lost(exc)

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.listener.release()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive, waiting for a request
            self.listener.resting(self)

    def make_room(self) -> None:
        """Close this idle kept-alive connection now, for a new one: its place is free at once."""
        self._release()
        self.transport.close()

    # --- bytes in ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # dropped unread: the answer is on its way and the connection closes
        if self.transport is None:
            self._early.append(data)
            return
        self.listener.working(self)
        start = 0
        while start < len(data) and not self._answered and not self.transport.is_closing():
            size = len(data) - start
            if self._head_left is not None:  # in a request's line and headers
                if self._timer is None:  # the first byte of a kept-alive connection's next request
                    self._arm(self.limits.header_timeout)
                self._started = True
                size = min(size, self._head_left)
                if size == 0:
                    limit = self.limits.max_header_bytes
                    self._refuse(431, "headers_too_large", f"the request headers exceed {limit} bytes (--http-max-header-bytes)")
                    return
                # at most the bytes the head may still take reach the parser; a request that ends within
                # them leaves the rest uncounted, so a head is refused past the limit and, pipelined, twice it
                self._head_left -= size
            super().data_received(data[start : start + size] if start or size < len(data) else data)
            start += size
            if self._refusal is not None:
                self._refuse(*self._refusal)

    # --- parser callbacks: ignored once a refusal is found, so that no request reaches the app -----

    def on_url(self, url: bytes) -> None:
        if self._refusal is None and len(self.url) + len(url) > (limit := self.limits.max_url_bytes):
            self._refusal = (414, "url_too_long", f"the URL exceeds {limit} bytes (--http-max-url-bytes)")
        if self._refusal is None:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is None:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._head_left = None
        self._body_since, self._body_bytes = self.loop.time(), 0
        self._arm(self.limits.body_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            self._body_bytes += len(body)
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._disarm()  # received whole: however long the answer takes is not the client's doing
        self._head_left, self._started = self.limits.max_header_bytes, False
        super().on_message_complete()

    # --- time ------------------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._head_left is None:  # in a body: it may take longer the more of it arrived
            allowed = self._body_since + self.limits.body_timeout + self._body_bytes / BODY_BYTES_PER_SECOND
            if (left := allowed - self.loop.time()) > 0:
                self._arm(left)
                return
        self.listener.dropped("timeout")
        if self.transport is None:  # still in the TLS handshake
            self._socket.abort()
            return
        if self._may_answer():
            limits = self.limits
            self._answer(408, f"the request was not complete in time: its headers within {limits.header_timeout:g} s, "
                              f"its body within {limits.body_timeout:g} s plus a second per MiB")  # fmt: skip
        else:
            self.transport.close()

    def _may_answer(self) -> bool:
        """A 408 is due to a client that began a request, unless a response to it, or to the one
        before it, is already being written."""
        if not self._started or self.cycle is None or not self.cycle.response_started:
            return self._started
        return self._head_left is not None and self.cycle.response_complete

    # --- refusals ------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.listener.dropped(reason)
        self._answer(status, message)

    def _answer(self, status: int, message: str) -> None:
        """Answer at once and parse nothing more of this connection."""
        self._answered = True
        self._disarm()
        body = json.dumps({"error": message}).encode()
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(STATUS_LINE[status] + head + body)
        if self.transport.can_write_eof():  # plain TCP: the answer, then FIN, then a short linger
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


async def listen(config: uvicorn.Config, listener: Listener) -> uvicorn.Server:
    """uvicorn's Server.startup, but each connection's protocol is given its listener, and the
    listening socket is plain: under TLS each connection makes its own handshake, timed and counted."""
    if not config.loaded:
        config.load()
    if not issubclass(config.http_protocol_class, LimitedHttpToolsProtocol):
        raise TypeError(f"{config.http_protocol_class} does not limit connections")
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    factory = partial(
        config.http_protocol_class,
        config=config,
        server_state=server.server_state,
        app_state=server.lifespan.state,
        listener=listener,
    )
    loop = asyncio.get_running_loop()
    server.servers = [await loop.create_server(factory, host=config.host, port=config.port, backlog=config.backlog)]
    server.started = True
    return server


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """grpc core channel arguments that bound what a connection may hold; grpc's defaults are unbounded."""
    options = [
        ("grpc.server_handshake_timeout_ms", round(settings.grpc_handshake_timeout_secs * 1000)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
    ]
    if settings.grpc_max_connection_idle_secs:
        options.append(("grpc.max_connection_idle_ms", round(settings.grpc_max_connection_idle_secs * 1000)))
    if settings.grpc_max_connections:
        options.append(("grpc.max_allowed_incoming_connections", settings.grpc_max_connections))
    return options


def ensure_open_files(settings: ServerSettings) -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does at start), and warn when it
    is below the connection caps: past it, connections fail in accept() instead of being refused."""
    http = settings.http_max_connections if settings.http_port >= 0 else 0
    wanted = http + settings.metrics_max_connections + settings.grpc_max_connections + FILES_IN_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.info("the open-file limit stays %d: raising it to %d failed: %s", soft, target, err)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-file limit (ulimit -n) is %d, below the connection caps plus %d in reserve (%d): past it, "
            "new connections fail instead of being refused; raise it, or lower --http-max-connections, "
            "--metrics-max-connections, --grpc-max-connections",
            soft, FILES_IN_RESERVE, wanted,
        )  # fmt: skip
    return soft
