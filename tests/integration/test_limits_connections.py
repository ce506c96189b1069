"""Attacks on the listeners' connections, each beside an honest caller (tests/prober.py) whose every
answer must come within 300 ms: oversized request heads, connections that never complete a request,
more connections than the caps, the process out of file descriptors, and gRPC's counterparts. The
server's CPU time, resident memory, descriptors and threads are read from /proc. Timeouts are
shortened by flags, so that the module runs in well under a minute."""

import http.client
import os
import resource
import select
import socket
import ssl
import struct
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from server.launcher import launch
from tests import onnx_models
from tests.certificates import make_certificates
from tests.conftest import ROOT, Samples, ServerProcess, parse_samples, start_server, wait_until
from tests.prober import Prober, open_fds, resident_bytes

MODEL = "plus"
HTTP_TIMEOUT, METRICS_TIMEOUT, GRPC_TIMEOUT = 1.0, 2.0, 1.0  # seconds, by flag
HTTP_CAP, METRICS_CAP, GRPC_CAP = 40, 210, 30
FLAGS = (
    "--http-header-timeout-secs", str(HTTP_TIMEOUT), "--http-body-timeout-secs", str(HTTP_TIMEOUT),
    "--metrics-header-timeout-secs", str(METRICS_TIMEOUT),
    "--http-max-connections", str(HTTP_CAP), "--metrics-max-connections", str(METRICS_CAP),
    "--grpc-handshake-timeout-secs", str(GRPC_TIMEOUT), "--grpc-max-connection-idle-secs", str(GRPC_TIMEOUT),
    "--grpc-max-connections", str(GRPC_CAP),
)  # fmt: skip
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS frame
MIB = 1 << 20


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, MODEL, onnx_models.add_one(), "max_batch_size: 8")
    return repository


@pytest.fixture(scope="module")
def server(repository):
    running = start_server(repository, *FLAGS)
    yield running
    assert running.stop() == 0


def prober(server: ServerProcess, rest: bool = True) -> Prober:
    return Prober(server.url, server.http_url if rest else "", MODEL)


def assert_unharmed(probe: Prober) -> None:
    assert not probe.failures, probe.failures[:5]
    assert probe.worst_ms() < 300, f"an honest caller waited {probe.worst_ms():.0f} ms"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def connect(port: int, count: int = 1) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def close_all(sockets) -> None:
    for sock in sockets:
        sock.close()


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
        while b"\r\n" not in answer and (data := sock.recv(4096)):
            answer += data
        return answer.partition(b"\r\n")[0], sent


def close_times(sockets: list[socket.socket], timeout: float, trickle: list[socket.socket] = ()) -> list[float | None]:
    """Seconds until the server closed each socket (None: still open after `timeout`); meanwhile
    every socket of `trickle` sends one more header byte each 0.2 s."""
    started = time.monotonic()
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
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                closed[sock] = time.monotonic() - started
    return [closed.get(sock) for sock in sockets]


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as err:  # closed by the server already: close_times sees it at its next read
        assert isinstance(err, (BrokenPipeError, ConnectionResetError)), err


# --- request heads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /v2/models/plus HTTP/1.1\r\nhost: x\r\nx-big: ", b"431"),  # a 16 MiB header
        (b"GET /v2/models/plus?q=", b"414"),  # a 16 MiB URL
    ],
    ids=["header", "url"],
)
def test_an_oversized_head_is_refused_before_it_is_read(server, head, status):
    pid = server.process.pid
    with prober(server) as probe:
        cpu, memory = cpu_seconds(pid), resident_bytes(pid)
        answer, sent = send_until_answered(server.http_port, head, 16 * MIB)
        cpu, memory = cpu_seconds(pid) - cpu, resident_bytes(pid) - memory
    cost = f"answer {answer!r} after {sent} bytes sent; server CPU {cpu:.2f} s, memory {memory / MIB:+.0f} MiB"
    assert cpu < 0.5 and memory < 50 * MIB, cost
    assert sent < 2 * MIB and answer.startswith(b"HTTP/1.1 " + status), cost
    assert_unharmed(probe)
    reason = "headers_too_large" if status == b"431" else "url_too_long"
    assert server.metric("onnxserve_connections_dropped_total", listener="http", reason=reason) >= 1


def test_a_head_within_the_limits_is_served(server):
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}", headers={"x-pad": "a" * 30000})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_each_request_of_a_connection_gets_the_whole_header_budget(server):
    """Three requests of 40 KiB headers each, pipelined in one write: 120 KiB in all, each within 64 KiB."""
    one = b"GET /v2/models/plus HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 40000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(one * 3)
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 3 and (data := sock.recv(65536)):
            answers += data
    assert answers.count(b"HTTP/1.1 200") == 3, answers[:200]


# --- requests that never complete ----------------------------------------------------------------


def test_connections_that_never_complete_a_request_are_closed(server):
    pid = server.process.pid
    with prober(server) as probe:
        files = open_fds(pid)
        silent = connect(server.http_port, 20)
        trickle = connect(server.http_port, 10)
        for sock in trickle:
            sock.sendall(b"GET /v2/models/plus HTTP/1.1\r\nx-slow: ")
        metrics = connect(server.metrics_port, 20)
        try:
            assert wait_until(lambda: open_fds(pid) >= files + 45, 2)  # all accepted
            http = close_times(silent + trickle, HTTP_TIMEOUT + 2, trickle)
            scrapers = close_times(metrics, METRICS_TIMEOUT + 2)
        finally:
            close_all(silent + trickle + metrics)
        assert wait_until(lambda: open_fds(pid) <= files + 3, 5), (open_fds(pid), files)
    assert all(seconds is not None and HTTP_TIMEOUT * 0.8 < seconds < HTTP_TIMEOUT + 1.5 for seconds in http), http
    assert all(seconds is not None and seconds < METRICS_TIMEOUT + 1.5 for seconds in scrapers), scrapers
    assert_unharmed(probe)


def test_a_body_that_never_completes_is_answered_408(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/plus/infer HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        started = time.monotonic()
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert HTTP_TIMEOUT * 0.8 < time.monotonic() - started < HTTP_TIMEOUT + 1.5


# --- caps ------------------------------------------------------------------------------------------


def test_rest_connections_beyond_the_cap_are_refused_and_counted(server):
    refused = server.metric("onnxserve_connections_refused_total", listener="http")
    with prober(server, rest=False) as probe:  # the prober's REST calls would be refused too
        attackers = connect(server.http_port, HTTP_CAP + 20)
        try:
            first = [sock.recv(64) for sock in attackers]  # at once for the refused, at the timeout for the others
        finally:
            close_all(attackers)
    turned_away = sum(answer.startswith(b"HTTP/1.1 503") for answer in first)
    assert 20 <= turned_away <= 22, first
    assert server.metric("onnxserve_connections_refused_total", listener="http") - refused == turned_away
    assert_unharmed(probe)
    with prober(server) as probe:  # the attackers are gone: REST answers again
        time.sleep(0.3)
    assert_unharmed(probe)


def test_a_full_listener_closes_the_longest_idle_kept_alive_connection_for_a_new_one(server):
    kept = [http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10) for _ in range(HTTP_CAP)]
    try:
        for connection in kept:  # every place held by a connection kept alive after its request
            connection.request("GET", "/v2/health/live")
            assert connection.getresponse().read() == b""
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live", timeout=5) as response:
            assert response.status == 200
    finally:
        close_all(kept)


def test_idle_metrics_connections_hold_no_threads_and_the_cap_holds(server):
    pid = server.process.pid
    refused = server.metric("onnxserve_connections_refused_total", listener="metrics")
    with prober(server) as probe:
        before_threads, before_files = threads(pid), open_fds(pid)
        idle = connect(server.metrics_port, 200)
        try:
            assert wait_until(lambda: open_fds(pid) >= before_files + 200, 2)
            assert threads(pid) <= before_threads + 2, (before_threads, threads(pid))
            beyond = connect(server.metrics_port, 40)  # 30 over the cap
            turned_away = sum(sock.recv(64).startswith(b"HTTP/1.1 503") for sock in beyond)
            close_all(beyond)
        finally:
            close_all(idle)
    assert 28 <= turned_away <= 31, turned_away
    assert wait_until(lambda: server.metric("onnxserve_connections_refused_total", listener="metrics") - refused >= 28)
    assert_unharmed(probe)


def test_tls_handshakes_count_against_the_timeout(repository, tmp_path):
    """The listeners are plain sockets that start TLS per connection: a client that never says
    ClientHello is closed at the header timeout, and an https scrape meanwhile is answered."""
    certs = make_certificates(tmp_path / "certs")
    tls = [f"--{endpoint}-{flag}" for endpoint in ("http", "metrics") for flag in ("use-ssl", "server-cert", "server-key")]
    values = ["true", str(certs.server.cert), str(certs.server.key)] * 2
    running = start_server(repository, *(item for pair in zip(tls, values) for item in pair), *FLAGS)
    try:
        context = ssl.create_default_context(cafile=str(certs.ca.cert))

        def scrape() -> Samples:
            url = f"https://127.0.0.1:{running.metrics_port}/metrics"
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                return parse_samples(response.read().decode())

        silent = connect(running.http_port, 5) + connect(running.metrics_port, 5)
        try:
            assert scrape().get("onnxserve_connections_open", listener="http") == 5
            closed = close_times(silent, METRICS_TIMEOUT + 2)
        finally:
            close_all(silent)
        assert all(seconds is not None and seconds < METRICS_TIMEOUT + 1.5 for seconds in closed), closed
        dropped = scrape()
    finally:
        running.stop()
    assert dropped.get("onnxserve_connections_dropped_total", listener="http", reason="timeout") == 5
    assert dropped.get("onnxserve_connections_dropped_total", listener="metrics", reason="timeout") == 5


def low_file_limit() -> None:
    """preexec_fn: the server starts with 256 file descriptors at most."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_out_of_file_descriptors_the_log_stays_small_and_service_resumes(repository):
    arguments = [
        "--model-repository", str(repository), "--grpc-address", "127.0.0.1", "--grpc-port", "0",
        "--metrics-address", "127.0.0.1", "--metrics-port", "0", "--http-address", "127.0.0.1", "--http-port", "0",
        "--http-header-timeout-secs", "2",
    ]  # fmt: skip
    server = launch(arguments, into=ServerProcess(None), cwd=ROOT, preexec_fn=low_file_limit)
    try:
        log_before = sum(len(line) + 1 for line in server.log)
        with prober(server, rest=False) as probe:  # gRPC on its open channel keeps answering throughout
            attackers = connect(server.http_port, 300)  # the kernel's backlog takes what accept() cannot
            try:
                assert wait_until(lambda: any("Too many open files" in line for line in server.log), 5)
                closed = close_times(attackers, 15)
            finally:
                close_all(attackers)
        assert all(seconds is not None for seconds in closed), f"{closed.count(None)} still open"
        log_growth = sum(len(line) + 1 for line in server.log) - log_before
        assert log_growth < 4096, f"{log_growth} bytes:\n" + server.log_text(last=20)[-3000:]
        assert_unharmed(probe)
        with prober(server) as probe:  # REST accepts again, and /metrics and gRPC answer
            assert "onnxserve_connections_open" in server.metrics()
        assert_unharmed(probe)
    finally:
        server.process.kill()
        server.wait(10)


# --- gRPC -------------------------------------------------------------------------------------------


def test_grpc_closes_silent_and_idle_connections(server):
    grpc_port = int(server.url.rpartition(":")[2])
    with prober(server) as probe:
        silent = connect(grpc_port)  # never says HTTP/2
        idle = connect(grpc_port)
        idle[0].sendall(PREFACE)  # says HTTP/2, then makes no call
        try:
            closed = close_times(silent + idle, GRPC_TIMEOUT + 3)
        finally:
            close_all(silent + idle)
    assert all(seconds is not None and seconds < GRPC_TIMEOUT + 1.5 for seconds in closed), closed
    assert_unharmed(probe)


def test_grpc_connections_beyond_the_cap_are_closed_at_once(server):
    grpc_port = int(server.url.rpartition(":")[2])
    with prober(server) as probe:
        attackers = connect(grpc_port, GRPC_CAP + 10)
        try:
            for sock in attackers:
                sock.sendall(PREFACE)
            first = [sock.recv(64) for sock in attackers]  # the server's SETTINGS, or the end at once
        finally:
            close_all(attackers)
    assert 10 <= first.count(b"") <= 12, [len(answer) for answer in first]
    assert_unharmed(probe)


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """An HTTP/2 frame (RFC 9113 section 4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_integer(value: int, prefix_bits: int = 7) -> bytes:
    """RFC 7541 section 5.1, with the bits above the prefix zero (a literal, not Huffman-coded)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    encoded, value = [limit], value - limit
    while value >= 128:
        encoded.append(value & 127 | 128)
        value >>= 7
    return bytes([*encoded, value])


def literal(name: bytes, value: bytes, length: int | None = None) -> bytes:
    """A header field without indexing, new name (RFC 7541 section 6.2.2); `length` may promise more value to come."""
    return b"\x00" + hpack_integer(len(name)) + name + hpack_integer(len(value) if length is None else length) + value


def frames(data: bytes) -> list[int]:
    """The types of the whole frames in `data`."""
    kinds, offset = [], 0
    while offset + 9 <= len(data):
        kinds.append(data[offset + 3])
        offset += 9 + int.from_bytes(data[offset : offset + 3], "big")
    return kinds


def test_huge_grpc_metadata_is_refused_before_it_is_read(server):
    """grpc's own default (16 KiB of metadata at most), checked: a 16 MiB header value, sent raw in
    16 KiB CONTINUATION frames, is answered RESOURCE_EXHAUSTED long before its end."""
    pid, total, chunk = server.process.pid, 16 * MIB, 16 * 1024
    path = b"/inference.GRPCInferenceService/ServerLive"
    block = (b"\x83\x86\x04" + hpack_integer(len(path)) + path + b"\x01\x01x"  # POST, http, the path, authority x
             + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers") + literal(b"x-big", b"", total))  # fmt: skip
    with prober(server) as probe, socket.create_connection(("127.0.0.1", int(server.url.rpartition(":")[2])), timeout=5) as sock:
        cpu = cpu_seconds(pid)
        sock.sendall(PREFACE + frame(1, 0, 1, block))  # HEADERS on stream 1, the block not ended
        received, sent = b"", 0
        while sent < total and not {1, 3, 7} & set(frames(received)):  # until HEADERS, RST_STREAM or GOAWAY
            if select.select([sock], [], [], 0)[0]:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                continue
            sock.sendall(frame(9, 4 if sent + chunk == total else 0, 1, b"a" * chunk))  # CONTINUATION
            sent += chunk
            time.sleep(0.0005)
        cpu = cpu_seconds(pid) - cpu
    assert sent < 8 * MIB and {1, 3} & set(frames(received)), (sent, frames(received))
    assert cpu < 0.5
    assert_unharmed(probe)
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", metadata=(("x-big", "a" * MIB),), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert "metadata size exceeds" in refused.value.details()
