"""A real onnxserve process on loopback ports, started as a user would start it: the tests, the
benchmark and the GPU check share it. Standard library and prometheus_client only, so that it runs
where the test tools are not installed (tritonclient is imported only by `client()`)."""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from server.tools.launcher import HTTP_LINE, LISTENING_LINE, NOT_READY_LINE, READY_LINE, Launched, launch
from server.tools.metrics_reader import Samples, fetch_text, parse_samples

__all__ = [  # the log lines are re-exported for the tests
    "HTTP_LINE",
    "LISTENING_LINE",
    "NOT_READY_LINE",
    "READY_LINE",
    "ROOT",
    "ServerProcess",
    "start_server",
    "wait_until",
]
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess(Launched):
    """A launched server, with what tests and benchmarks ask of it."""

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def client(self):
        """A tritonclient.grpc client of this server."""
        import tritonclient.grpc as grpcclient  # a test tool: imported only where a test asks for it

        return grpcclient.InferenceServerClient(self.url)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def metrics(self) -> str:
        return fetch_text(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics; 0 when the series does not exist yet."""
        return self.samples().get(name, **labels)

    def samples(self) -> Samples:
        return parse_samples(self.metrics())


def start_server(
    repository: Path,
    *extra: str,
    wait_ready: bool = True,
    timeout: float = 120,
    root: Path = ROOT,
    environment: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `python -m server` on port 0 and wait for its ready (or not-ready) log line; `root`: the
    checkout whose `server` package runs (bench/compare.py starts an older one beside this one);
    `environment`: variables added to this process's (OTEL_* ones, say)."""
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
        *extra,
    ]
    env = {**os.environ, **environment} if environment else None
    return launch(arguments, wait_ready=wait_ready, timeout=timeout, into=ServerProcess(None), cwd=root, env=env)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
