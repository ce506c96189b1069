"""Start Seldon MLServer on one ONNX file (bench/mlserver/onnx_runtime.py, adaptive batching on).

    python -m bench.mlserver.serve MODEL.onnx [--name mlp] [--grpc-port 8001] [--http-port 8000]
        [--max-batch-size 64] [--max-batch-time 0.001] [--metrics-port 8002] [--workdir DIR]

runs until Ctrl-C. From Python (any environment: this module uses only the standard library,
plus grpcio when it is importable, to check the gRPC port too):

    from bench.mlserver import serve
    handle = serve.start("model.onnx", "mlp", grpc_port, http_port, 64, 0.001, workdir)
    ...  # KServe v2 gRPC on 127.0.0.1:grpc_port, REST on 127.0.0.1:http_port
    handle.stop()

MLServer runs from its own virtual environment, bench/.venv-mlserver (bench/mlserver/setup.sh),
as `bench/.venv-mlserver/bin/mlserver start WORKDIR` with bench/mlserver on PYTHONPATH and
WORKDIR as its working directory; its output goes to WORKDIR/mlserver.log. WORKDIR is written
to (settings.json, <name>/model-settings.json) and should hold nothing else: MLServer loads every
model-settings.json it finds under it.

Settings chosen for MLServer's best single-model throughput on a small (2-core) machine:

- parallel_workers 0: inference runs in the server process's event loop. With 1 (MLServer's
  default) every request is pickled to a worker process over multiprocessing queues and the
  response pickled back: on 2 cores that costs more CPU than the overlap gains. Measured with
  the tiny Gemm model (bench/mlserver/check.py): 64 callers ~1,750 req/s with 0 against
  ~850-1,150 with 1; p50 at concurrency 1 ~2.6 ms against ~3.6-4.3 ms. See README.md.
- debug false: debug (MLServer's default) logs every gRPC call at INFO.
- metrics off unless metrics_port is given: with metrics on, every gRPC call also goes through
  py-grpc-prometheus' interceptor and MLServer's histograms.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peer_ready import free_port, grpc_ready, http_ready, model_name, serve_until_interrupted

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-mlserver"
MLSERVER = VENV / "bin" / "mlserver"
IMPLEMENTATION = "onnx_runtime.OnnxRuntime"


@dataclass
class Handle:
    process: subprocess.Popen
    model_name: str
    grpc_port: int
    http_port: int
    workdir: Path
    metrics_port: int | None = None
    log_path: Path = field(default=None)  # type: ignore[assignment]

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (MLServer shuts down cleanly), wait, then SIGKILL its process group.

        The group is MLServer's own (start_new_session): the server, its inference workers
        when parallel_workers > 0, and multiprocessing's resource tracker."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.process.wait(5)
        deadline = time.monotonic() + 5  # let stragglers in the group exit by themselves
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill_group()
        return self.process.returncode

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server leads its own group
        except (ProcessLookupError, PermissionError):
            pass


def write_settings(
    model_path,
    model_name: str,
    grpc_port: int,
    http_port: int,
    max_batch_size: int,
    max_batch_time_s: float,
    workdir,
    metrics_port: int | None = None,
    parallel_workers: int = 0,
    implementation: str = IMPLEMENTATION,
) -> Path:
    """settings.json and <name>/model-settings.json in workdir; returns workdir."""
    workdir = Path(workdir).resolve()
    (workdir / model_name).mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "parallel_workers": parallel_workers,
        # No message-size limit, like onnxserve's (gRPC's default would refuse > 4 MiB).
        "grpc_max_message_length": 2**31 - 1,
        "metrics_endpoint": "/metrics" if metrics_port else None,
        "metrics_port": metrics_port or free_port(),  # unused when off, but never 8082's clash
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": model_name,
        "implementation": implementation,
        "parameters": {"uri": str(Path(model_path).resolve())},
        # Adaptive batching: both must be set (> 1 and > 0) or MLServer silently leaves it off.
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s,
    }
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (workdir / model_name / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    return workdir


def start(
    model_path,
    model_name: str,
    grpc_port: int,
    http_port: int,
    max_batch_size: int,
    max_batch_time_s: float,
    workdir,
    *,
    metrics_port: int | None = None,
    parallel_workers: int = 0,
    threads: int | None = None,
    implementation: str = IMPLEMENTATION,
    timeout: float = 120.0,
) -> Handle:
    """Launch MLServer on model_path and wait until the model is ready on HTTP and gRPC."""
    if not MLSERVER.exists():
        raise FileNotFoundError(f"{MLSERVER} is missing: run bench/mlserver/setup.sh")
    workdir = write_settings(
        model_path,
        model_name,
        grpc_port,
        http_port,
        max_batch_size,
        max_batch_time_s,
        workdir,
        metrics_port,
        parallel_workers,
        implementation,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = str(HERE)  # onnx_runtime.py; nothing from the caller's environment
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["ONNX_INTRA_OP_THREADS"] = str(threads)
    log_path = workdir / "mlserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(MLSERVER), "start", str(workdir)],
            cwd=workdir,  # MLServer puts .metrics/ and .envs/ in its working directory
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() can kill workers too
        )
    handle = Handle(process, model_name, grpc_port, http_port, workdir, metrics_port, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"MLServer exited with {process.returncode}:\n{handle.log()[-4000:]}")
        if http_ready(http_port, model_name) and grpc_ready(grpc_port, model_name) is not False:
            return handle
        if time.monotonic() > deadline:
            handle.stop()
            raise TimeoutError(f"MLServer not ready after {timeout:.0f} s:\n{handle.log()[-4000:]}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="path to model.onnx")
    parser.add_argument("--name", help="model name (default: the parent folder's, or the file's stem)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here (default: off)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-time", type=float, default=0.001, help="seconds")
    parser.add_argument("--parallel-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args(argv)
    name = args.name or model_name(args.model)
    with tempfile.TemporaryDirectory(prefix="mlserver-") as scratch:
        workdir = args.workdir or Path(scratch)
        handle = start(
            args.model,
            name,
            args.grpc_port,
            args.http_port,
            args.max_batch_size,
            args.max_batch_time,
            workdir,
            metrics_port=args.metrics_port,
            parallel_workers=args.parallel_workers,
            threads=args.threads,
        )
        print(
            f"MLServer ready: model '{name}' on gRPC {handle.grpc_url}, REST {handle.http_url}"
            + (f", metrics http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else "")
            + f"; log {handle.log_path}. Ctrl-C to stop.",
            flush=True,
        )
        return serve_until_interrupted(handle, "MLServer")


if __name__ == "__main__":
    sys.exit(main())
