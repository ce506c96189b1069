"""Ports, readiness checks and the serve-until-Ctrl-C loop shared by the benchmark's peer
launchers (standard library, plus grpcio where it is importable), so they run in any environment."""

import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ready(port: int, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def grpc_ready(port: int, name: str) -> bool | None:
    """gRPC ModelReady without generated stubs; None when grpcio is not importable here."""
    try:
        import grpc
    except ImportError:
        return None
    encoded = name.encode()
    request = b"\x0a" + bytes([len(encoded)]) + encoded if len(encoded) < 128 else None
    if request is None:
        return None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
            return call(request, timeout=1) == b"\x08\x01"  # ModelReadyResponse{ready: true}
    except grpc.RpcError:
        return False


def model_name(model: Path) -> str:
    """<repo>/<name>/<version>/model.onnx -> name; any other path -> the file's stem."""
    return model.parent.parent.name if model.parent.name.isdigit() else model.stem


def serve_until_interrupted(handle, label: str) -> int:
    """Wait while the peer serves; Ctrl-C stops it (0), its own exit is an error (1)."""
    try:
        while handle.process.poll() is None:
            time.sleep(0.5)
        print(f"{label} exited with {handle.process.returncode}:\n{handle.log()[-4000:]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopping {label} ...", file=sys.stderr)
        return 0 if handle.stop() in (0, -signal.SIGTERM) else 1
    finally:
        handle.stop()
