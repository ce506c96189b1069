"""Attacks on the gRPC listener's connections, each beside an honest caller (tests/prober.py)
whose every answer must come within 300 ms: connections that never say HTTP/2 or never make a
call, more connections than the cap, huge metadata. grpc core bounds these by the channel
arguments server/frontend/process_limits.py sets; timeouts are shortened by flags."""

import select
import socket
import struct
import time

import grpc
import pytest

from tests import onnx_models
from tests.attacks import assert_unharmed, close_all, close_times, connect, cpu_beyond_baseline, probing, recv_or_reset
from tests.conftest import ServerProcess, start_server

MODEL = "plus"
GRPC_TIMEOUT, GRPC_CAP = 1.0, 30  # seconds, connections, by flag
FLAGS = (
    "--grpc-handshake-timeout-secs",
    str(GRPC_TIMEOUT),
    "--grpc-max-connection-idle-secs",
    str(GRPC_TIMEOUT),
    "--grpc-max-connections",
    str(GRPC_CAP),
)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS frame
MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, MODEL, onnx_models.add_one(), "max_batch_size: 8")
    running = start_server(repository, *FLAGS)
    yield running
    assert running.stop() == 0


def prober(server: ServerProcess):
    return probing(server.url, server.http_url, MODEL)


def test_grpc_closes_silent_and_idle_connections(server):
    with prober(server) as probe:
        silent = connect(server.grpc_port)  # never says HTTP/2
        idle = connect(server.grpc_port)
        idle[0].sendall(PREFACE)  # says HTTP/2, then makes no call
        try:
            closed = close_times(silent + idle, GRPC_TIMEOUT + 3)
        finally:
            close_all(silent + idle)
    assert all(seconds is not None and seconds < GRPC_TIMEOUT + 1.5 for seconds in closed), closed
    assert_unharmed(probe)


def test_grpc_connections_beyond_the_cap_are_closed_at_once(server):
    with prober(server) as probe:
        attackers = connect(server.grpc_port, GRPC_CAP + 10)
        try:
            for sock in attackers:
                sock.sendall(PREFACE)
            first = [recv_or_reset(sock, 64) for sock in attackers]  # the server's SETTINGS, or the end at once
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
    with prober(server) as probe:
        (sent, received), cpu = cpu_beyond_baseline(
            server.process.pid, lambda: send_huge_metadata(server.grpc_port, 16 * MIB)
        )
    assert sent < 8 * MIB and {1, 3} & set(frames(received)), (sent, frames(received))
    assert cpu < 0.5, f"server CPU {cpu:+.2f} s beyond the prober's"
    assert_unharmed(probe)
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(
            b"", metadata=(("x-big", "a" * MIB),), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert "metadata size exceeds" in refused.value.details()


def send_huge_metadata(port: int, total: int, chunk: int = 16 * 1024) -> tuple[int, bytes]:
    """A call whose header block promises an x-big value of `total` bytes, sent until the server
    ends the stream or the connection; (the value bytes sent, the frames received). grpc refuses
    within the first 16 KiB it parses; what arrives meanwhile is the time its answer took."""
    path = b"/inference.GRPCInferenceService/ServerLive"
    block = (
        b"\x83\x86\x04"
        + hpack_integer(len(path))
        + path
        + b"\x01\x01x"  # POST, http, the path, authority x
        + literal(b"content-type", b"application/grpc")
        + literal(b"te", b"trailers")
        + literal(b"x-big", b"", total)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(PREFACE + frame(1, 0, 1, block))  # HEADERS on stream 1, the block not ended
        received, sent = b"", 0
        while sent < total and not {1, 3, 7} & set(frames(received)):  # until HEADERS, RST_STREAM or GOAWAY
            if select.select([sock], [], [], 0)[0]:
                if not (data := recv_or_reset(sock, 65536)):
                    break
                received += data
                continue
            sock.sendall(frame(9, 4 if sent + chunk == total else 0, 1, b"a" * chunk))  # CONTINUATION
            sent += chunk
            time.sleep(0.002)  # 8 MB/s: grpc's answer may wait for a core on a loaded machine, a second at least
        return sent, received
