"""Start NVIDIA PyTriton on one ONNX file (bench/pytriton/model.py, Triton's dynamic batcher on).

    python -m bench.pytriton.serve MODEL.onnx [--name mlp] [--grpc-port 8001] [--http-port 8000]
        [--max-batch-size 64] [--workdir DIR]

runs until Ctrl-C. From Python (any environment: this module uses only the standard library,
plus grpcio when it is importable, to check the gRPC port too):

    from bench.pytriton import serve
    handle = serve.start("model.onnx", "mlp", grpc_port, http_port, 64, workdir)
    ...  # KServe v2 gRPC on 127.0.0.1:grpc_port, REST on 127.0.0.1:http_port
    handle.stop()

PyTriton runs from its own virtual environment, bench/.venv-pytriton (bench/pytriton/setup.sh),
as `bench/.venv-pytriton/bin/python bench/pytriton/model.py ...` in a new session. That process
starts Triton's tritonserver, which starts one Python backend stub per model instance; the stub
forwards every batch to model.py's onnxruntime callable. WORKDIR gets pytriton.log (model.py's
output), triton.log (Triton's), workspace/ (PyTriton's copy of Triton, ~25 MB, and its
sockets), home/ (HOME and PyTriton's cache) and tmp/ (TMPDIR). Outside it Triton writes only
its Python backend's shared memory (/dev/shm/pytrtion<pid>-*) and a copy of the stub's code
(/tmp/folderXXXXXX, a fixed path in Triton): a clean stop removes both, and stop() removes
them itself after it had to kill.

Settings, all PyTriton/Triton defaults except where the benchmark needs otherwise:

- ModelConfig(max_batch_size=N) with the default DynamicBatcher: max_queue_delay 0, so Triton
  batches whatever has queued while the previous batch ran and never waits for more. The
  benchmark runs every server at its defaults; no queue delay is tuned.
- One model instance (PyTriton's default): batches run one at a time, each with onnxruntime
  ORT_SEQUENTIAL and one intra-op thread per usable core, as onnxserve's raw baseline.
- gRPC and HTTP on 127.0.0.1 only; metrics off (nothing reads them, and no third port that
  could clash with another server's 8002).
- Triton logs at its default level to triton.log: without a log file PyTriton keeps Triton's
  whole output in a Python string.

PyTriton's Python stub has been seen to hang at start, so start() gives up after `timeout`
seconds, kills the whole session and raises with the end of the logs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peer_ready import grpc_ready, http_ready, model_name, serve_until_interrupted

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-pytriton"
PYTHON = VENV / "bin" / "python"


@dataclass
class Handle:
    process: subprocess.Popen
    model_name: str
    grpc_port: int
    http_port: int
    workdir: Path
    _stub_folders: set[Path] = field(default_factory=set, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pytriton.log"

    def log(self) -> str:
        """model.py's output, then Triton's."""
        parts = []
        for path in (self.log_path, self.workdir / "triton.log"):
            try:
                parts.append(f"==> {path.name} <==\n" + path.read_text(errors="replace"))
            except OSError:
                continue
        return "\n".join(parts)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (PyTriton stops Triton and its stubs), wait, then SIGKILL the whole session.

        model.py leads a session of its own (start_new_session): tritonserver and the stubs
        stay in it, so whatever survives the clean stop is found by session id."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_session()
                self.process.wait(5)
        deadline = time.monotonic() + 5  # let stragglers exit by themselves
        while self._session_members() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill_session()
        # What a killed Triton leaves behind (a clean stop removes both itself).
        for path in Path("/dev/shm").glob(f"pytrtion{self.process.pid}-*"):  # sic: PyTriton's spelling
            path.unlink(missing_ok=True)
        for folder in self._stub_folders:
            shutil.rmtree(folder, ignore_errors=True)
        return self.process.returncode

    def _session_members(self) -> list[int]:
        members = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[3]) == self.process.pid and fields[0] != "Z":  # session id, state
                members.append(int(entry.name))
        return members

    def _kill_session(self) -> None:
        members = self._session_members()
        for pid in members:
            try:  # Triton copies the stub's code to a /tmp/folderXXXXXX of its own (not TMPDIR)
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 1:
                folder = Path(os.fsdecode(argv[1])).parents[1]
                if folder.name.startswith("folder"):
                    self._stub_folders.add(folder)
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def start(
    model_path, model_name: str, grpc_port: int, http_port: int, max_batch_size: int, workdir, *, timeout: float = 120.0
) -> Handle:
    """Launch PyTriton on model_path and wait until the model is ready on HTTP and gRPC."""
    if not PYTHON.exists():
        raise FileNotFoundError(f"{PYTHON} is missing: run bench/pytriton/setup.sh")
    workdir = Path(workdir).resolve()
    # PyTriton refuses an existing workspace, which a killed run leaves behind.
    for stale in ("workspace", "tmp"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    (workdir / "triton.log").unlink(missing_ok=True)  # one log per run
    home, tmp = workdir / "home", workdir / "tmp"
    for path in (home, tmp):
        path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTRITON_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        PYTRITON_HOME=str(home / "pytriton"),
        TMPDIR=str(tmp),
        PYTHONUNBUFFERED="1",
    )
    command = [
        str(PYTHON),
        str(HERE / "model.py"),
        str(Path(model_path).resolve()),
        "--name",
        model_name,
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--max-batch-size",
        str(max_batch_size),
        "--workdir",
        str(workdir),
    ]
    with open(workdir / "pytriton.log", "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() finds tritonserver and the stubs by this session
        )
    handle = Handle(process, model_name, grpc_port, http_port, workdir)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            handle.stop()
            raise RuntimeError(f"PyTriton exited with {process.returncode}:\n{handle.log()[-4000:]}")
        if http_ready(http_port, model_name) and grpc_ready(grpc_port, model_name) is not False:
            return handle
        if time.monotonic() > deadline:
            handle.stop(timeout=5)
            raise TimeoutError(f"PyTriton not ready after {timeout:.0f} s:\n{handle.log()[-4000:]}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="path to model.onnx")
    parser.add_argument("--name", help="model name (default: the parent folder's, or the file's stem)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the model")
    args = parser.parse_args(argv)
    name = args.name or model_name(args.model)
    # PyTriton runs in a session of its own, so SIGTERM must reach stop() rather than end us alone.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="pytriton-") as scratch:
        workdir = args.workdir or Path(scratch)
        handle = start(
            args.model, name, args.grpc_port, args.http_port, args.max_batch_size, workdir, timeout=args.timeout
        )
        print(
            f"PyTriton ready: model '{name}' on gRPC {handle.grpc_url}, REST {handle.http_url}; "
            f"logs in {workdir}. Ctrl-C to stop.",
            flush=True,
        )
        return serve_until_interrupted(handle, "PyTriton")


if __name__ == "__main__":
    sys.exit(main())
