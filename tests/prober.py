"""An honest caller beside an attack: it keeps asking a running server for a small inference over
gRPC and REST and records how long each answer took, so a test can say that no other caller
waited longer than a bound while the attack ran. Also the server process's open file descriptors,
resident memory and CPU time, read from /proc, for the attack's resource bounds.

The prober runs in a process of its own: an attack sent from the test's process (serialising a
16 MB request, say) holds that process's GIL, and a prober thread beside it would time the test's
own client rather than the server."""

import multiprocessing
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)
SETTLE_SECONDS = 0.3  # answers before the attack starts, not counted: the first carries the connects


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

    def __enter__(self) -> "Prober":
        context = multiprocessing.get_context("spawn")  # no fork of a test process that holds grpc threads
        self._stop, self._results = context.Event(), context.Queue()
        self._process = context.Process(
            target=_probe,
            args=(self.grpc_url, self.http_url, self.model, self.interval, self._stop, self._results),
            daemon=True,
        )
        self._process.start()
        if not self._results.get(timeout=60) == "counting":
            raise RuntimeError("the prober did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.grpc_ms, self.http_ms, self.failures = self._results.get(timeout=60)
        self._process.join(30)

    def worst_ms(self) -> float:
        """The longest wait of any answer during the attack; none at all is infinitely slow."""
        samples = self.grpc_ms + self.http_ms
        return max(samples) if samples else float("inf")


def _probe(grpc_url: str, http_url: str, model: str, interval: float, stop, results) -> None:
    counting = threading.Event()
    recorded: dict[str, list[float]] = {"grpc": [], "http": []}
    failures: list[str] = []
    callers = [
        threading.Thread(
            target=_call_grpc, args=(grpc_url, model, interval, stop, counting, recorded["grpc"], failures)
        )
    ]
    if http_url:
        callers.append(
            threading.Thread(
                target=_call_http, args=(http_url, model, interval, stop, counting, recorded["http"], failures)
            )
        )
    for caller in callers:
        caller.start()
    time.sleep(SETTLE_SECONDS)
    counting.set()
    results.put("counting")
    for caller in callers:
        caller.join()
    results.put((recorded["grpc"], recorded["http"], failures))


def _timed(call, counting: threading.Event, recorded: list[float], failures: list[str], what: str) -> None:
    started = time.perf_counter()
    try:
        call()
    except Exception as err:  # noqa: BLE001 - a failed honest call is what the test reports
        failures.append(f"{what}: {err}")
    if counting.is_set():
        recorded.append((time.perf_counter() - started) * 1e3)


def _call_grpc(url: str, model: str, interval: float, stop, counting, recorded, failures) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("x", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)

    def call() -> None:
        answer = client.infer(model, [tensor], client_timeout=10).as_numpy("y")
        if not np.array_equal(answer, ROWS + 1):
            raise AssertionError(f"wrong answer {answer!r}")

    while not stop.wait(interval):
        _timed(call, counting, recorded, failures, "gRPC")
    client.close()


def _call_http(url: str, model: str, interval: float, stop, counting, recorded, failures) -> None:
    body = (
        b'{"inputs":[{"name":"x","shape":[2,4],"datatype":"FP32","data":' + str(ROWS.ravel().tolist()).encode() + b"}]}"
    )
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer", data=body, headers={"content-type": "application/json"}
    )

    def call() -> None:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    while not stop.wait(interval):
        _timed(call, counting, recorded, failures, "REST")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
