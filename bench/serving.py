"""A real onnxserve process on loopback ports, started as a user would start it: the tests, the
benchmark and the GPU check share it. Standard library and prometheus_client only, so that it runs
where the test tools are not installed (tritonclient is imported only by `client()`)."""

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = re.compile(r"ready: gRPC port (\d+), metrics port (\d+)")
NOT_READY_LINE = re.compile(r"not ready: ")
# " (TLS)" or " (mTLS)" follows a port that serves TLS; /metrics over TLS is https://
LISTENING_LINE = re.compile(r"listening: gRPC on [^:]+:(\d+)(?: \(m?TLS\))?, metrics on https?://[^:]+:(\d+)/metrics")
HTTP_LINE = re.compile(r", HTTP on [^:]+:(\d+)(?: \(m?TLS\))?;")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    grpc_port: int = 0
    metrics_port: int = 0
    http_port: int = 0  # 0 when HTTP is off
    log: list[str] = field(default_factory=list)
    ready: bool = False
    reader: threading.Thread | None = None

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
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics; 0 when the series does not exist yet."""
        return self.samples().get(name, **labels)

    def samples(self) -> "Samples":
        return parse_samples(self.metrics())

    def log_text(self) -> str:
        return "\n".join(self.log)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code


@dataclass(frozen=True)
class Samples:
    values: dict

    def get(self, name: str, **labels: str) -> float:
        """One sample's value, or the sum over the series that add labels not named (a request
        counter's `protocol`); 0 when no series matches yet."""
        exact = self.values.get((name, tuple(sorted(labels.items()))))
        return self.total(name, **labels) if exact is None else exact

    def total(self, name: str, **labels: str) -> float:
        """Sum over the series of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, found), v in self.values.items() if n == name and wanted <= set(found))

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


def parse_samples(text: str) -> Samples:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Samples(parsed)


def start_server(repository: Path, *extra: str, wait_ready: bool = True, timeout: float = 120) -> ServerProcess:
    """Start `python -m server` on port 0 and wait for its ready (or not-ready) log line."""
    command = [
        sys.executable, "-m", "server",
        "--model-repository", str(repository),
        "--grpc-address", "127.0.0.1", "--grpc-port", "0",
        "--metrics-address", "127.0.0.1", "--metrics-port", "0",
        "--http-address", "127.0.0.1", "--http-port", "0",
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = ServerProcess(process)
    seen = threading.Event()

    def drain() -> None:
        for line in process.stderr:
            server.log.append(line.rstrip("\n"))
            if match := LISTENING_LINE.search(line):
                server.grpc_port, server.metrics_port = int(match[1]), int(match[2])
                if http := HTTP_LINE.search(line):
                    server.http_port = int(http[1])
            if READY_LINE.search(line):
                server.ready = True
                seen.set()
            elif NOT_READY_LINE.search(line) or (not wait_ready and server.grpc_port):
                seen.set()
        process.stderr.close()
        seen.set()

    server.reader = threading.Thread(target=drain, daemon=True)
    server.reader.start()
    if not seen.wait(timeout) or not server.grpc_port:
        process.kill()
        server.wait(10)
        raise RuntimeError("onnxserve did not start:\n" + server.log_text())
    return server


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
