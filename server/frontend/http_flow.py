"""What a REST or /metrics connection's parser is fed, and when (server/frontend/connection_limits.py): the time
uvicorn kept reading paused, and the bytes of a request body around its data."""

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.flow_control import FlowControl

# A chunked body's bytes around its chunks count against --http-max-header-bytes, less this much
# per chunk: a size line of 16 hex digits (a 64-bit size) with its CRLF, and the CRLF after the data.
CHUNK_FRAMING_BYTES = 20
# A chunked body is fed to the parser at most as many bytes at a time as its framing may still take,
# but no fewer than this: a client at the edge of its budget does not cost a parser call per byte.
MIN_CHUNKED_SLICE = 4096


class TimedFlowControl(FlowControl):
    """uvicorn's flow control, adding up the time reading was paused: uvicorn pauses it while a
    pipelined request waits for the response before it and while the app has not taken the body
    received, and the client cannot send what the server does not read: that time is not the client's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, resumed) -> None:
        super().__init__(transport)
        self._loop, self._resumed = loop, resumed
        self._paused_since, self._paused = 0.0, 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_since = self._loop.time()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self._paused += self._loop.time() - self._paused_since
            super().resume_reading()
            self._resumed()

    def paused_seconds(self) -> float:
        """Seconds reading was paused since the connection started, this pause included."""
        return self._paused + (self._loop.time() - self._paused_since if self.read_paused else 0.0)


@dataclass(slots=True)
class BodyCount:
    """One request's body as it arrives: its bytes, and the bytes around them that the parser was fed
    (a chunked body's size lines, extensions and trailers: httptools joins a trailer's pieces as it
    does a header's). Those that came in the same read as the head were counted as head bytes, so
    the framing may take twice --http-max-header-bytes at most."""

    length: int | None  # the content-length; None: chunked
    received: int = 0
    framing: int = 0
    chunks: int = 0

    def framing_left(self, max_header_bytes: int) -> int:
        return max_header_bytes + CHUNK_FRAMING_BYTES * self.chunks - self.framing

    def next_slice(self, size: int, max_header_bytes: int) -> int:
        """How much of `size` bytes to feed the parser at once: all of a content-length body that is
        still to come and no more (what follows is the next request's head, counted as such); of a
        chunked one, what its framing may still take, so that a trailer stops near its limit."""
        if self.length is not None:
            return min(size, max(1, self.length - self.received))
        return min(size, max(MIN_CHUNKED_SLICE, self.framing_left(max_header_bytes)))
