"""What one connection may cost the server, on the REST and /metrics listeners.

They run uvicorn's httptools protocol, which bounds nothing before a request's headers are
complete: httptools joins the pieces of a header value (a trailer's too) by bytes concatenation and
uvicorn joins the URL's the same way, so their cost grows with the square of the size (one 256 MiB
header: 85 s of CPU), and uvicorn's keep-alive timer starts only after a response, so a connection
that never completes a request stays open for good. LimitedHttpToolsProtocol counts a request's
head bytes before the parser sees them, its URL as parsed, and the bytes of a chunked body that are
not body (chunk-size lines, extensions, trailers), and answers 431 or 414 past the limit without
reading on (what the client still sends is dropped unparsed, then the connection closes); closes a
connection whose request does not arrive in time, TLS handshake included (the listening socket is
plain and each connection starts its own TLS, so that a handshake counts like any other wait),
leaving out the time the server itself stopped reading; and refuses connections beyond a cap per
listener. A refusal of a pipelined request is written after the responses to those before it.
Listener (server/frontend/listeners.py) keeps the count and the metrics. gRPC's bounds and the process's:
server/frontend/process_limits.py.
"""

import asyncio
import json
import logging
from functools import partial

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.frontend.http_flow import BodyCount, TimedFlowControl
from server.frontend.listeners import ConnectionMetrics, HttpLimits, Listener, http_limits

__all__ = ["ConnectionMetrics", "HttpLimits", "LimitedHttpToolsProtocol", "Listener", "http_limits", "listen"]

log = logging.getLogger(__name__)

# A body may take its timeout plus one second per MiB received: a big upload on a slow link still
# finishes, a trickle of a few bytes a second does not hold the connection for long.
BODY_BYTES_PER_SECOND = 1 << 20
# After a refusal, what the client still sends is read and dropped (never parsed nor kept) this long,
# so that a client busy writing its request reads the answer instead of a connection reset.
LINGER_SECONDS = 1.0
SERVICE_UNAVAILABLE = STATUS_LINE[503] + b"content-length: 0\r\nconnection: close\r\n\r\n"


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounds on each request's URL, headers and time, and on
    its listener's open connections. asyncio calls connection_made with the TCP connection; under
    TLS the handshake follows, then connection_ready starts uvicorn's protocol."""

    def __init__(self, config, server_state, app_state, _loop=None, *, listener: Listener) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.listener = listener
        self.limits = self.listener.limits
        self._admitted = False
        self._socket: asyncio.Transport | None = None  # the TCP connection (under TLS, beneath self.transport)
        self._handshake: asyncio.Task | None = None
        self._early: list[bytes] = []  # under TLS, bytes that came with the end of the handshake
        self._timer: asyncio.TimerHandle | None = None
        self._clock: float | None = None  # the timeout of the wait being timed; None: none is (a request is answered)
        self._clock_since, self._clock_paused = 0.0, 0.0  # when it started, and the reading paused until then
        self._head_left = self.limits.max_header_bytes  # of the request line and headers being received
        self._body: BodyCount | None = None  # in a body: what arrived of it; None: in a head
        self._started = False  # a byte of the current request arrived
        self._refusal: tuple[int, str, str] | None = None  # found by a parser callback: the parser is ignored
        self._answered = False  # refused: what else arrives is dropped
        self._deferred: tuple[int, str] | None = None  # the refusal's answer, due after an earlier response

    # --- the connection ------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._socket = transport
        if not self.listener.admit():
            if self.config.ssl is None:  # under TLS a status would need the handshake it saves
                transport.write(SERVICE_UNAVAILABLE)
            transport.close()
            return
        self._admitted = True
        self._start_clock(self.limits.header_timeout)
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
                self._stop_clock()
                self._release()
        if secure is not None and not secure.is_closing():
            self.connection_ready(secure)

    def connection_ready(self, transport) -> None:
        """The connection carries HTTP now (after the TLS handshake, if any): uvicorn's protocol starts."""
        super().connection_made(transport)
        self.flow = TimedFlowControl(transport, self.loop, self._reading_resumed)  # before any request holds it
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.working(self)
        self._stop_clock()
        self._release()
        if self.transport is not None:  # uvicorn's protocol had started
            super().connection_lost(exc)

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.listener.release()

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)  # uvicorn starts the next request now: its response comes first
        super().on_response_complete()
        if self._deferred is not None:
            if not queued and not self.transport.is_closing():
                self._answer(*self._deferred)
        elif self.timeout_keep_alive_task is not None:  # kept alive, waiting for a request
            self.listener.resting(self)

    def make_room(self) -> None:
        """Close this idle kept-alive connection now, for a new one: its place is free at once."""
        self._release()
        self.transport.close()

    # --- bytes in ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # dropped unread: the answer is on its way, or waits for an earlier one; then the connection closes
        if self.transport is None:
            self._early.append(data)
            return
        self.listener.working(self)
        start = 0
        while start < len(data) and not self._answered and not self.transport.is_closing():
            body = self._body
            if body is None:  # in a request's line and headers
                size = self._head_slice(len(data) - start)
                if size == 0:
                    limit = self.limits.max_header_bytes
                    self._refuse(
                        431, "headers_too_large", f"the request headers exceed {limit} bytes (--http-max-header-bytes)"
                    )
                    return
            else:
                size, received = body.next_slice(len(data) - start, self.limits.max_header_bytes), body.received
            super().data_received(data[start : start + size] if start or size < len(data) else data)
            start += size
            if self._refusal is not None:
                self._refuse(*self._refusal)
            elif body is not None and body is self._body and not self._answered:  # still in that body
                body.framing += size - (body.received - received)
                self._check_framing(body)

    def _head_slice(self, size: int) -> int:
        """At most the bytes the head may still take reach the parser. A request that ends within them
        leaves the rest uncounted, so a head is refused past the limit and, pipelined, twice it."""
        if self._clock is None:  # bytes before a kept-alive connection's next request begins
            self._start_clock(self.limits.header_timeout)
        self._started = True
        size = min(size, self._head_left)
        self._head_left -= size
        return size

    def _check_framing(self, body: BodyCount) -> None:
        if body.framing_left(limit := self.limits.max_header_bytes) < 0:
            self._refuse(
                431,
                "headers_too_large",
                f"the request's chunk-size lines and trailers exceed {limit} bytes (--http-max-header-bytes)",
            )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP: like a refusal, it waits for an earlier response."""
        self._refuse(400, None, msg)

    # --- parser callbacks: ignored once a refusal is found, so that no request reaches the app -----

    def on_message_begin(self) -> None:
        if self._refusal is None:
            self._started = True
            if self._clock is None:  # it may begin in the bytes that ended the request before it
                self._start_clock(self.limits.header_timeout)
        super().on_message_begin()

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
        self._body = BodyCount(self._content_length())
        self._start_clock(self.limits.body_timeout)  # before uvicorn may pause reading: that pause is not counted
        super().on_headers_complete()

    def _content_length(self) -> int | None:
        """The body's length; None: chunked (the parser refuses a request with both, or a bad length)."""
        length = b"0"
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return None
            if name == b"content-length":
                length = value
        return int(length) if length.isdigit() else None

    def on_chunk_header(self) -> None:
        if self._body is not None:
            self._body.chunks += 1

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            self._body.received += len(body)
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._stop_clock()  # received whole: however long the answer takes is not the client's doing
        self._head_left, self._body, self._started = self.limits.max_header_bytes, None, False
        super().on_message_complete()

    # --- time ------------------------------------------------------------------------------------------

    def _start_clock(self, seconds: float) -> None:
        self._clock, self._clock_since, self._clock_paused = seconds, self.loop.time(), self._paused_seconds()
        self._arm(seconds)

    def _stop_clock(self) -> None:
        self._clock = None
        self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _paused_seconds(self) -> float:
        return (
            self.flow.paused_seconds() if isinstance(self.flow, TimedFlowControl) else 0.0
        )  # None until connection_ready

    def _time_left(self) -> float:
        """Of the wait being timed: its timeout, plus the time reading was paused meanwhile, plus a
        second per MiB of a body received."""
        allowed = self._clock_since + self._clock + self._paused_seconds() - self._clock_paused
        if self._body is not None:
            allowed += self._body.received / BODY_BYTES_PER_SECOND
        return allowed - self.loop.time()

    def _reading_resumed(self) -> None:
        if self._clock is not None and self._timer is None:  # it ran out while reading was paused
            self._arm(max(0.0, self._time_left()))

    def _timed_out(self) -> None:
        self._timer = None
        if self.flow is not None and self.flow.read_paused:
            return  # the client cannot send what is not read: _reading_resumed looks again
        if (left := self._time_left()) > 0:
            self._arm(left)
            return
        if self.transport is None or not self._started:  # in the TLS handshake, or no request begun
            self.listener.dropped("timeout")
            self._stop_clock()
            if self.transport is None:
                self._socket.abort()
            else:
                self.transport.close()
            return
        limits = self.limits
        self._refuse(
            408,
            "timeout",
            f"the request was not complete in time: its headers within {limits.header_timeout:g} s, "
            f"its body within {limits.body_timeout:g} s plus a second per MiB",
        )

    # --- refusals ------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str | None, message: str) -> None:
        """Answer the request being received with `status` (counted as dropped for `reason`), after
        the responses to the requests before it, and parse nothing more of this connection."""
        if reason is not None:
            self.listener.dropped(reason)
        self._answered = True
        self._stop_clock()
        earlier = self._earlier_response_due()
        if self._body is not None and not self._withdraw(self.cycle):
            self.transport.close()  # its own response began already: no status of ours can follow
        elif earlier:
            self._deferred = (status, message)  # on_response_complete answers once it is written
        else:
            self._answer(status, message)

    def _earlier_response_due(self) -> bool:
        """A response to an earlier request is still to be written."""
        if self._body is None:  # in a head: the last request uvicorn holds is an earlier one
            return self.cycle is not None and not self.cycle.response_complete
        return any(cycle is self.cycle for cycle, _ in self.pipeline)  # this one waits for the one before

    def _withdraw(self, cycle) -> bool:
        """The request of `cycle`, whose body is being received, reaches its app no further: not
        started if it is queued, and if running its app writes nothing and reads a disconnect. False
        if its response has begun."""
        cycle.disconnected = True
        cycle.message_event.set()
        for queued in self.pipeline:
            if queued[0] is cycle:
                self.pipeline.remove(queued)
                return True
        return not cycle.response_started

    def _answer(self, status: int, message: str) -> None:
        """Answer at once and parse nothing more of this connection."""
        self._answered, self._deferred = True, None
        self._stop_clock()
        self._unset_keepalive_if_required()
        body = json.dumps({"error": message}).encode()
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(STATUS_LINE[status] + head + body)
        if self.transport.can_write_eof():  # plain TCP: the answer, then FIN, then a short linger
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


async def listen(config: uvicorn.Config, listener: Listener, sock=None) -> uvicorn.Server:
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
    where = {"sock": sock} if sock is not None else {"host": config.host, "port": config.port}
    server.servers = [await loop.create_server(factory, backlog=config.backlog, **where)]
    server.started = True
    return server
