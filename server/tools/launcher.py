"""`python -m server` as a child process, followed through its log until it listens and is ready
(or says it is not): the server onnxserve-tune starts, and the one tests and benchmarks start
(bench/serving.py). Standard library only."""

import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

# The server's own log lines (server/app.py; ready: server/frontend/grpc_server.py). " (TLS)" or " (mTLS)" follows a port that serves
# TLS; /metrics over TLS is https://.
LISTENING_LINE = re.compile(r"listening: gRPC on [^:]+:(\d+)(?: \(m?TLS\))?, metrics on https?://[^:]+:(\d+)/metrics")
HTTP_LINE = re.compile(r", HTTP on [^:]+:(\d+)(?: \(m?TLS\))?;")
READY_LINE = re.compile(r"ready: gRPC port (\d+), metrics port (\d+)")
NOT_READY_LINE = re.compile(r"not ready: ")


class StartFailed(RuntimeError):
    """The server exited, or did not say it listens, in time; the message ends with its log."""


@dataclass
class Launched:
    process: subprocess.Popen
    grpc_port: int = 0
    metrics_port: int = 0
    http_port: int = 0  # 0 when HTTP is off
    log: list[str] = field(default_factory=list)
    ready: bool = False  # it said "ready:"; False after "not ready:" (a model failed to load)
    reader: threading.Thread | None = None

    def log_text(self, last: int = 0) -> str:
        return "\n".join(self.log[-last:] if last else self.log)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then its exit status (subprocess.TimeoutExpired if it outlives `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        return code


def launch(
    arguments: list[str], *, wait_ready: bool = True, timeout: float = 120, into: Launched | None = None, **popen
) -> Launched:
    """Start `python -m server ARGUMENTS` and return once it is ready or not ready (or, without
    `wait_ready`, once it listens); StartFailed otherwise. `into`: a Launched (or a dataclass
    derived from one) to fill; `popen`: cwd, env."""
    process = subprocess.Popen(
        [sys.executable, "-m", "server", *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    server = into if into is not None else Launched(process)
    server.process = process
    settled = threading.Event()

    def follow() -> None:
        for line in process.stderr:
            server.log.append(line.rstrip("\n"))
            if match := LISTENING_LINE.search(line):
                server.grpc_port, server.metrics_port = int(match[1]), int(match[2])
                if http := HTTP_LINE.search(line):
                    server.http_port = int(http[1])
            if NOT_READY_LINE.search(line) or (not wait_ready and server.grpc_port):
                settled.set()
            elif READY_LINE.search(line):
                server.ready = True
                settled.set()
        process.stderr.close()
        settled.set()

    server.reader = threading.Thread(target=follow, daemon=True)
    server.reader.start()
    if not settled.wait(timeout) or not server.grpc_port:
        process.kill()
        server.wait(10)
        raise StartFailed("onnxserve did not start:\n" + server.log_text(last=200))
    return server
