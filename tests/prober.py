"""An honest caller beside an attack: it keeps asking a running server for a small inference over
gRPC and REST, on threads of its own, and records how long each answer took, so a test can say
that no other caller waited longer than a bound while the attack ran. Also the server process's
open file descriptors and resident memory, read from /proc, for the attack's resource bounds."""

import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)


@dataclass
class Prober:
    """`with Prober(grpc_url, http_url, model) as probe: attack()`, then `probe.worst_ms()`.
    The model must answer y = x + 1 for x FP32 [n, 4] (tests.onnx_models.add_one)."""

    grpc_url: str
    http_url: str
    model: str
    interval: float = 0.02
    grpc_ms: list[float] = field(default_factory=list)
    http_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> "Prober":
        self._threads = [threading.Thread(target=self._grpc, daemon=True)]
        if self.http_url:
            self._threads.append(threading.Thread(target=self._http, daemon=True))
        for thread in self._threads:
            thread.start()
        time.sleep(0.3)  # a few answers before the attack, so an idle prober is never "fine"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def worst_ms(self) -> float:
        """The longest wait of any answer; a prober that got no answer at all is infinitely slow."""
        samples = self.grpc_ms + self.http_ms
        return max(samples) if samples else float("inf")

    def _grpc(self) -> None:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        tensor = grpcclient.InferInput("x", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS)
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                answer = client.infer(self.model, [tensor], client_timeout=10).as_numpy("y")
                if not np.array_equal(answer, ROWS + 1):
                    self.failures.append(f"gRPC: wrong answer {answer!r}")
            except Exception as err:  # noqa: BLE001 - a failed honest call is what the test reports
                self.failures.append(f"gRPC: {err}")
            self.grpc_ms.append((time.perf_counter() - started) * 1e3)
        client.close()

    def _http(self) -> None:
        body = (b'{"inputs":[{"name":"x","shape":[2,4],"datatype":"FP32","data":' + str(ROWS.ravel().tolist()).encode() + b"}]}")
        url = f"http://{self.http_url}/v2/models/{self.model}/infer"
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
            except Exception as err:  # noqa: BLE001 - a failed honest call is what the test reports
                self.failures.append(f"REST: {err}")
            self.http_ms.append((time.perf_counter() - started) * 1e3)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
