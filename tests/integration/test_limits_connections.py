"""Attacks on the REST and /metrics listeners' connections, each beside an honest caller
(tests/prober.py) whose every answer must come within 300 ms: oversized request heads and trailers,
connections that never complete a request, more connections than the caps, the process out of file
descriptors. The server's CPU time, resident memory, descriptors and threads are read from /proc.
Timeouts are shortened by flags, so that the module runs in well under a minute. gRPC's
counterparts: test_limits_grpc.py; pipelined requests: test_limits_pipelining.py."""

import http.client
import json
import resource
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from server.tools.launcher import launch
from tests import onnx_models
from tests.attacks import (
    assert_unharmed,
    close_all,
    close_times,
    connect,
    cpu_beyond_baseline,
    probing,
    read_responses,
    recv_or_reset,
    send_until_answered,
    threads,
)
from tests.certificates import make_certificates
from tests.conftest import ROOT, Samples, ServerProcess, parse_samples, start_server, wait_until
from tests.prober import open_fds, resident_bytes

MODEL = "plus"
HTTP_TIMEOUT, METRICS_TIMEOUT = 1.0, 2.0  # seconds, by flag
HTTP_CAP, METRICS_CAP = 40, 210
FLAGS = (
    "--http-header-timeout-secs",
    str(HTTP_TIMEOUT),
    "--http-body-timeout-secs",
    str(HTTP_TIMEOUT),
    "--metrics-header-timeout-secs",
    str(METRICS_TIMEOUT),
    "--http-max-connections",
    str(HTTP_CAP),
    "--metrics-max-connections",
    str(METRICS_CAP),
)
MIB = 1 << 20
CHUNKED_POST = (
    b"POST /v2/models/plus/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


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


def prober(server: ServerProcess, rest: bool = True):
    return probing(server.url, server.http_url if rest else "", MODEL)


# --- request heads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /v2/models/plus HTTP/1.1\r\nhost: x\r\nx-big: ", b"431"),  # a 16 MiB header
        (b"GET /v2/models/plus?q=", b"414"),  # a 16 MiB URL
        (CHUNKED_POST + b"1\r\n{\r\n0\r\nx-big: ", b"431"),  # a 16 MiB trailer, after the body's last chunk
        (CHUNKED_POST + b"1;x=" + b"a" * 1000, b"431"),  # a 16 MiB chunk extension
    ],
    ids=["header", "url", "trailer", "chunk-extension"],
)
def test_an_oversized_head_is_refused_before_it_is_read(server, head, status):
    pid = server.process.pid
    with prober(server) as probe:
        memory = resident_bytes(pid)
        (answer, sent), cpu = cpu_beyond_baseline(pid, lambda: send_until_answered(server.http_port, head, 16 * MIB))
        memory = resident_bytes(pid) - memory
    cost = f"answer {answer!r} after {sent} bytes sent; server CPU {cpu:+.2f} s, memory {memory / MIB:+.0f} MiB"
    assert cpu < 0.5 and memory < 50 * MIB, cost
    assert sent < 2 * MIB and answer.startswith(b"HTTP/1.1 " + status), cost
    assert_unharmed(probe)
    reason = "headers_too_large" if status == b"431" else "url_too_long"
    assert server.metric("onnxserve_connections_dropped_total", listener="http", reason=reason) >= 1


def test_a_chunked_body_with_trailers_within_the_limits_is_served(server):
    """12,000 chunks of one byte (60 KB of chunk-size lines and CRLFs, not counted as trailers) and
    40 KB of trailers: over 64 KiB together, each within its own allowance."""
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}' + b" " * 12000
    chunks = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    trailers = b"x-a: " + b"a" * 20000 + b"\r\nx-b: " + b"b" * 20000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(CHUNKED_POST)
        time.sleep(0.1)  # read apart from the head: every byte of the body is counted as such
        sock.sendall(chunks + b"0\r\n" + trailers + b"\r\n")
        (status, answer), *_ = read_responses(sock, 10, count=1)[0]
    assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0], answer[:300]


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
        connected = time.monotonic()  # before any connect: each server timer starts at its accept, later
        silent = connect(server.http_port, 20)
        trickle = connect(server.http_port, 10)
        for sock in trickle:
            sock.sendall(b"GET /v2/models/plus HTTP/1.1\r\nx-slow: ")
        metrics = connect(server.metrics_port, 20)
        try:
            assert wait_until(lambda: open_fds(pid) >= files + 45, 2)  # all accepted
            http = close_times(silent + trickle, HTTP_TIMEOUT + 2, trickle, since=connected)
            scrapers = close_times(metrics, METRICS_TIMEOUT + 2, since=connected)
        finally:
            close_all(silent + trickle + metrics)
        assert wait_until(lambda: open_fds(pid) <= files + 3, 5), (open_fds(pid), files)
    assert all(seconds is not None and HTTP_TIMEOUT * 0.95 < seconds < HTTP_TIMEOUT + 1.5 for seconds in http), http
    assert all(seconds is not None and seconds < METRICS_TIMEOUT + 1.5 for seconds in scrapers), scrapers
    assert_unharmed(probe)


def test_a_body_that_never_completes_is_answered_408(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        started = time.monotonic()  # before the send: the server's timer starts when it reads the head, later
        sock.sendall(
            b"POST /v2/models/plus/infer HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert HTTP_TIMEOUT * 0.95 < time.monotonic() - started < HTTP_TIMEOUT + 1.5


# --- caps ------------------------------------------------------------------------------------------


def test_rest_connections_beyond_the_cap_are_refused_and_counted(server):
    refused = server.metric("onnxserve_connections_refused_total", listener="http")
    with prober(server, rest=False) as probe:  # the prober's REST calls would be refused too
        attackers = connect(server.http_port, HTTP_CAP + 20)
        try:
            first = [
                recv_or_reset(sock, 64) for sock in attackers
            ]  # at once for the refused, at the timeout for the others
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
            turned_away = sum(recv_or_reset(sock, 64).startswith(b"HTTP/1.1 503") for sock in beyond)
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
    tls = [
        f"--{endpoint}-{flag}" for endpoint in ("http", "metrics") for flag in ("use-ssl", "server-cert", "server-key")
    ]
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
        "--model-repository",
        str(repository),
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--http-address",
        "127.0.0.1",
        "--http-port",
        "0",
        "--http-header-timeout-secs",
        "2",
    ]
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
