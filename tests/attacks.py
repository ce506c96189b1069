"""Raw-socket clients for the connection-limit tests (tests/integration/test_limits_*.py): what a
well-behaved HTTP library never sends (a head that does not end, pipelined requests, a chunked body
with a huge trailer), and the measures of what it cost the server while an honest caller
(tests/prober.py) kept asking it for inferences."""

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tests.prober import Prober, cpu_seconds

T = TypeVar("T")
# An attack answered within a few milliseconds ends before the prober's next call: the prober is
# kept running this long at least, so that it times some answers whatever the attack's length.
MIN_PROBE_SECONDS = 0.25


@contextmanager
def probing(grpc_url: str, http_url: str, model: str) -> Iterator[Prober]:
    """A Prober over the block's attack, kept running MIN_PROBE_SECONDS at least."""
    with Prober(grpc_url, http_url, model) as probe:
        started = time.monotonic()
        yield probe
        time.sleep(max(0.0, MIN_PROBE_SECONDS - (time.monotonic() - started)))


def assert_unharmed(probe: Prober) -> None:
    assert not probe.failures, probe.failures[:5]
    assert probe.worst_ms() < 300, f"an honest caller waited {probe.worst_ms():.0f} ms"


def cpu_beyond_baseline(pid: int, attack: Callable[[], T]) -> tuple[T, float]:
    """`attack()`'s result, and the server CPU seconds it cost beyond what the same wall time costs
    without it: the server also answers the prober meanwhile, and on a loaded machine that share
    alone can come near any fixed bound."""
    cpu, started = cpu_seconds(pid), time.monotonic()
    result = attack()
    spent, wall = cpu_seconds(pid) - cpu, time.monotonic() - started
    cpu = cpu_seconds(pid)
    time.sleep(wall)
    return result, spent - (cpu_seconds(pid) - cpu)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def connect(port: int, count: int = 1) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def close_all(sockets) -> None:
    for sock in sockets:
        sock.close()


def recv_or_reset(sock: socket.socket, size: int) -> bytes:
    """What the server sent; b"" once it closed, with a reset too (it closed with our bytes unread)."""
    try:
        return sock.recv(size)
    except ConnectionResetError:
        return b""


def send_until_answered(port: int, head: bytes, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """`head`, then up to `total` bytes of 'a' a chunk at a time, 2 ms apart, until the server answers;
    the head ended when all was sent. Returns (the status line, the filler bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sent, filler = 0, b"a" * chunk
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(filler)
            except OSError:  # the server closed: its answer, if any, is waiting to be read
                break
            sent += chunk
            time.sleep(0.002)
        if sent >= total:
            sock.sendall(b"\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer and (data := recv_or_reset(sock, 4096)):
            answer += data
        return answer.partition(b"\r\n")[0], sent


def close_times(
    sockets: list[socket.socket], timeout: float, trickle: list[socket.socket] = (), since: float | None = None
) -> list[float | None]:
    """Seconds from `since` (time.monotonic(); default now) until the server closed each socket
    (None: still open `timeout` seconds from now); meanwhile every socket of `trickle` sends one
    more header byte each 0.2 s."""
    started = time.monotonic()
    since = started if since is None else since
    closed: dict[socket.socket, float] = {}
    next_byte = started
    while len(closed) < len(sockets) and time.monotonic() - started < timeout:
        if time.monotonic() >= next_byte:
            for sock in trickle:
                if sock not in closed:
                    _send_quietly(sock, b"x")
            next_byte += 0.2
        readable, _, _ = select.select([s for s in sockets if s not in closed], [], [], 0.05)
        for sock in readable:
            if not recv_or_reset(sock, 65536):
                closed[sock] = time.monotonic() - since
    return [closed.get(sock) for sock in sockets]


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as err:  # closed by the server already: close_times sees it at its next read
        assert isinstance(err, (BrokenPipeError, ConnectionResetError)), err


def read_responses(sock: socket.socket, timeout: float, count: int = 0) -> tuple[list[tuple[int, bytes]], bool]:
    """The whole HTTP/1.1 responses the server sends within `timeout` seconds (or its first `count`),
    as (status, body), and whether it closed the connection after them."""
    buffer, responses = b"", []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        while (parsed := _one_response(buffer)) is not None:
            status, body, buffer = parsed
            responses.append((status, body))
        if count and len(responses) >= count:
            return responses, False
        sock.settimeout(left)
        try:
            data = recv_or_reset(sock, 65536)
        except TimeoutError:
            return responses, False
        if not data:
            return responses, True
        buffer += data
    return responses, False


def _one_response(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    """(status, body, the bytes after it) of the response that `buffer` starts with, if it is whole."""
    head, found, rest = buffer.partition(b"\r\n\r\n")
    if not found:
        return None
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    status = int(lines[0].split()[1])
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while (size_line := rest.partition(b"\r\n"))[1]:
            size = int(size_line[0], 16)
            if len(size_line[2]) < size + 2:
                return None
            body, rest = body + size_line[2][:size], size_line[2][size + 2 :]
            if size == 0:  # the last chunk: its size line, then the CRLF that ends the (empty) trailers
                return status, body, rest
        return None
    length = int(headers.get(b"content-length", b"0"))
    return (status, rest[:length], rest[length:]) if len(rest) >= length else None
