"""A real onnxserve process on loopback ports, started as a user would start it: the tests, the
benchmark and the GPU check share it. Standard library and prometheus_client only, so that it runs
where the test tools are not installed (tritonclient is imported only by `client()`)."""

import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.tools.launcher import HTTP_LINE, LISTENING_LINE, NOT_READY_LINE, READY_LINE, Launched, launch

__all__ = [  # the log lines are re-exported for the tests
    "HTTP_LINE", "LISTENING_LINE", "NOT_READY_LINE", "READY_LINE", "ROOT", "Samples", "ServerProcess",
    "parse_samples", "start_server", "wait_until",
]  # fmt: skip
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
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics; 0 when the series does not exist yet."""
        return self.samples().get(name, **labels)

    def samples(self) -> "Samples":
        return parse_samples(self.metrics())


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
    arguments = [
        "--model-repository", str(repository),
        "--grpc-address", "127.0.0.1", "--grpc-port", "0",
        "--metrics-address", "127.0.0.1", "--metrics-port", "0",
        "--http-address", "127.0.0.1", "--http-port", "0",
        *extra,
    ]  # fmt: skip
    return launch(arguments, wait_ready=wait_ready, timeout=timeout, into=ServerProcess(None), cwd=ROOT)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
