"""Pipelined REST requests under the connection limits (server/frontend/connection_limits.py): a refusal or
a timeout of a later request waits for the responses to the earlier ones, the time the server
stops reading (a pipelined request waits for the one before it) is not the client's, and every
request's head is timed, whichever segment it starts in. The earlier request is an inference of a
model whose run takes as long as the test asks (tests/onnx_models.slow_add_one)."""

import json
import socket
import time
from pathlib import Path

import pytest

from tests import onnx_models
from tests.attacks import read_responses
from tests.conftest import ServerProcess, start_server

TIMEOUT = 1.0  # seconds, by flag: the REST header and body timeouts
FLAGS = ("--http-header-timeout-secs", str(TIMEOUT), "--http-body-timeout-secs", str(TIMEOUT))
LIVE = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository: Path = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), "max_batch_size: 8")
    running = start_server(repository, *FLAGS)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def slow(server) -> "SlowRequests":
    return SlowRequests.calibrated(server)


class SlowRequests:
    """Inference requests of the slow model that run for about as long as asked: a run takes a fixed
    time (~0.1 s) plus a time per round, both measured on this machine."""

    def __init__(self, rounds_per_second: float, fixed_seconds: float) -> None:
        self.rounds_per_second, self.fixed_seconds = rounds_per_second, fixed_seconds

    @classmethod
    def calibrated(cls, server: ServerProcess) -> "SlowRequests":
        rounds, before = 50, None
        while rounds < 10**7:  # until the runs of two round counts differ by enough to time well
            started = time.monotonic()
            exchange(server, cls.request(rounds), 60, count=1)
            now = (rounds, time.monotonic() - started)
            if before is not None and now[1] - before[1] > 0.2:
                rate = (now[0] - before[0]) / (now[1] - before[1])
                return cls(rate, max(0.0, now[1] - now[0] / rate))
            rounds, before = rounds * 4, now
        pytest.fail("the slow model's runs take no longer with more rounds")

    def __call__(self, seconds: float) -> bytes:
        return self.request(max(1, round((seconds - self.fixed_seconds) * self.rounds_per_second)))

    @staticmethod
    def request(rounds: int) -> bytes:
        return post(
            json.dumps(
                {
                    "inputs": [
                        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                        {"name": "work", "shape": [1, 1], "datatype": "INT64", "data": [rounds]},
                    ]
                }
            ).encode()
        )


def post(body: bytes, length: int | None = None) -> bytes:
    head = b"POST /v2/models/slow/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    return head + b"content-length: %d\r\n\r\n" % (len(body) if length is None else length) + body


def exchange(
    server: ServerProcess, data: bytes, timeout: float, count: int = 0
) -> tuple[list[tuple[int, bytes]], bool]:
    """Send `data` on a new connection; the responses (the first `count`), and whether it then closed."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(data)
        return read_responses(sock, timeout, count)


def answered_the_slow_request(response: tuple[int, bytes]) -> bool:
    status, body = response
    return status == 200 and json.loads(body)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]


def no_write_errors(server: ServerProcess, since: int) -> bool:
    """Nothing logged since line `since` of a response written after the connection's end."""
    return not any("write_eof" in line or "Traceback" in line for line in server.log[since:])


@pytest.mark.parametrize(
    "later, status",
    [
        (b"GET /v2/health/live HTTP/1.1\r\nx-big: " + b"a" * 300_000, 431),  # refused at once, past twice the limit
        (b"GET /v2/health/live HTTP/1.1\r\nx-slow: ", 408),  # its head never ends
        (post(b"", length=100), 408),  # its body never comes
        (b"NOT HTTP\r\n\r\n", 400),  # the parser fails: uvicorn's own answer
    ],
    ids=["oversized-head", "incomplete-head", "missing-body", "not-http"],
)
def test_a_refused_request_is_answered_after_the_one_before_it(server, slow, later, status):
    """Sent right behind a request that runs 2 s, a request refused or timed out within 1 s gets its
    answer after the first one's response, which is whole; then the connection closes."""
    log = len(server.log)
    responses, closed = exchange(server, slow(2 * TIMEOUT) + later, 6 * TIMEOUT)
    assert [status for status, _ in responses] == [200, status] and closed, responses
    assert answered_the_slow_request(responses[0]), responses[0]
    assert no_write_errors(server, log), server.log_text(last=20)


def test_time_the_server_does_not_read_is_not_the_clients(server, slow):
    """A pipelined request's body, sent after the body timeout while the server had stopped reading
    (its request waits for the one before), is read once it reads again: both are answered."""
    first, second = (
        slow(3 * TIMEOUT),
        post(
            b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},'
            b'{"name":"work","shape":[1,1],"datatype":"INT64","data":[1]}]}'
        ),
    )
    head, _, body = second.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(first)
        time.sleep(0.3)  # the first request is read whole and running
        sock.sendall(head + b"\r\n\r\n")
        time.sleep(TIMEOUT * 1.5)
        sock.sendall(body)
        responses, _ = read_responses(sock, 6 * TIMEOUT, count=2)
    assert [status for status, _ in responses] == [200, 200], responses
    assert all(answered_the_slow_request(response) for response in responses), responses


def test_a_head_that_starts_behind_another_request_is_timed(server):
    """A request, and the start of another in the same segment: the second is answered 408 at the
    header timeout, not left open for the keep-alive timeout (75 s)."""
    started = time.monotonic()
    responses, closed = exchange(server, LIVE + b"GET /v2/health/live HTTP/1.1\r\nx-slow: ", 4 * TIMEOUT)
    assert [status for status, _ in responses] == [200, 408] and closed, responses
    assert time.monotonic() - started < TIMEOUT + 1.5


def test_slow_requests_take_about_as_long_as_asked(server, slow):
    started = time.monotonic()
    responses, _ = exchange(server, slow(2 * TIMEOUT), 6 * TIMEOUT, count=1)
    assert answered_the_slow_request(responses[0]) and 1.6 * TIMEOUT < time.monotonic() - started < 4 * TIMEOUT
