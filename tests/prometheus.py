"""A real Prometheus server for tests: started on loopback, queried over its HTTP API."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prometheus_binary() -> str:
    """The prometheus executable; skips the test where it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    return binary


def start_prometheus(binary: str, workdir: Path, target: str, **options) -> "Prometheus":
    """A Prometheus scraping `target`, ready to answer queries."""
    prometheus = Prometheus(binary, workdir, target, **options)
    if not wait_until(prometheus.ready, timeout=30):
        prometheus.stop()
        raise AssertionError("prometheus did not become ready:\n" + prometheus.log.read_text()[-3000:])
    return prometheus


class Prometheus:
    """Prometheus on a free loopback port, scraping `target` every second; `labels` are
    added to the target's series (as Kubernetes discovery would add namespace and pod)."""

    def __init__(
        self, binary: str, workdir: Path, target: str, rule_files=(), labels: dict | None = None, features=()
    ) -> None:
        config = workdir / "prometheus.yml"
        static = {"targets": [target], "labels": labels or {}}
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(path) for path in rule_files],
                    "scrape_configs": [{"job_name": "onnxserve", "static_configs": [static]}],
                }
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    *(f"--enable-feature={feature}" for feature in features),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expression: str, at: float | None = None) -> list:
        """An instant query, now or at `at` (seconds since the epoch)."""
        params = {"query": expression} if at is None else {"query": expression, "time": f"{at:.3f}"}
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", (expression, body)
        return body["data"]["result"]

    def value(self, expression: str, **labels: str) -> float | None:
        for series in self.query(expression):
            if all(series["metric"].get(key) == wanted for key, wanted in labels.items()):
                return float(series["value"][1])
        return None

    def exemplar_labels(self, expression: str) -> list[dict]:
        """The labels of the exemplars stored for `expression`'s series over the last hour."""
        now = time.time()
        params = urllib.parse.urlencode({"query": expression, "start": f"{now - 3600:.3f}", "end": f"{now:.3f}"})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_exemplars?{params}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", (expression, body)
        return [exemplar["labels"] for series in body["data"] for exemplar in series["exemplars"]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
