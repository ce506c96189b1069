"""Front-end processes under the engine's (`--frontends N`, N > 1): their listening sockets, their
start, their restart when one dies, and their stop.

This process keeps the models, batching, the bill and /metrics; each front end serves gRPC and
REST (server/frontend/process.py) and reaches the engine over the link (server/frontend/link*.py).
The gRPC port is reserved here with SO_REUSEPORT, so that port 0 names one port for all, and every
front end binds it too; REST's socket listens here and every front end accepts on it.
"""

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from server.config import ServerSettings
from server.errors import ConfigError
from server.frontend import link_shm
from server.frontend.process import HTTP_FD_VARIABLE, INDEX_VARIABLE, LINK_VARIABLE

log = logging.getLogger("onnxserve")

# --frontends auto. Measured on the benchmark MLP at 64 callers (bench/split.py, README "Several
# front-end processes"): a front end spends about 236 us of CPU per unary gRPC request, the engine
# about 29 us per request while front ends keep it busy: one engine keeps up with 8 front ends.
# Each front end wants a core of its own and the engine one. On 2 cores, 2 front ends served 1.17x
# one process over unary gRPC but 0.82 to 0.87x over streams and REST: below 3 cores, one process.
ENGINE_KEEPS_UP_WITH = 8
FEWEST_CORES_TO_SPLIT = 3


def frontend_count(asked: int, cores: int) -> int:
    """The front ends to start: `asked`, or for auto (0) one per core beside the engine's, as many
    as one engine keeps up with, and 1 (one process) on fewer than 3 cores."""
    if asked:
        return asked
    return 1 if cores < FEWEST_CORES_TO_SPLIT else min(cores - 1, ENGINE_KEEPS_UP_WITH)


SCRATCH_PREFIX = "onnxserve-"  # the engine's scratch directory: onnxserve-<pid>-<random>


def scratch_directory() -> tempfile.TemporaryDirectory:
    """Where the link's socket and the front ends' metric files live, removed at the stop. An
    engine killed (SIGKILL, the OOM killer) cannot remove its own, nor its front ends' tensors in
    shared memory: the next one removes those whose process is gone."""
    if removed := link_shm.remove_stale():
        log.info("removed %d tensor(s) that front ends gone left in shared memory", removed)
    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"{SCRATCH_PREFIX}*-*"):
        owner = stale.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and stale.is_dir() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


RESTART_PAUSES = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # after 1, 2, ... deaths in a row: a crash loop stays slow
HEALTHY_SECONDS = 60.0  # a front end up this long starts its count of deaths afresh


def reserve_grpc_port(settings: ServerSettings) -> socket.socket:
    """A socket bound to the gRPC address with SO_REUSEPORT, not listening: it holds the port's
    number (port 0 picks one) for the front ends, which bind it too and listen."""
    return _bound(settings.grpc_address, settings.grpc_port, "--grpc-port", socket.SO_REUSEPORT)


def listen_http(settings: ServerSettings) -> socket.socket:
    """REST's listening socket, which every front end inherits and accepts on."""
    listening = _bound(settings.http_address, settings.http_port, "--http-port", socket.SO_REUSEADDR)
    listening.listen(2048)
    return listening


def _bound(address: str, port: int, flag: str, option: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    bound.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        bound.bind((address.strip("[]"), port))
    except OSError as err:
        bound.close()
        raise ConfigError(f"{flag}: cannot bind {address}:{port}: {err.strerror}") from None
    return bound


class Frontends:
    """The front-end processes: started with this server's own flags, the reserved gRPC port and
    REST's descriptor; restarted when one dies, until the stop."""

    def __init__(self, count: int, argv: list[str], grpc_port: int, http: socket.socket | None, link: str) -> None:
        self.count, self.argv, self.grpc_port, self.http, self.link = count, argv, grpc_port, http, link
        # prometheus_client's multiprocess files of the front ends' series, beside the link's socket
        self.metrics_directory = os.path.join(os.path.dirname(link), "metrics")
        os.makedirs(self.metrics_directory, exist_ok=True)
        self.restarted = 0  # front ends started again, in all
        self.processes: dict[int, subprocess.Popen] = {}
        self.restarts: dict[int, float] = {}  # index -> when a dead one starts again (monotonic)
        self.started: dict[int, float] = {}  # index -> when it was last started
        self.deaths: dict[int, int] = {}  # index -> deaths in a row
        self.stopping = False

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self.processes[index] = self._spawn(index)

    async def listening(self, listening: dict, greeted: asyncio.Event, timeout: float) -> None:
        """Until every front end says it listens (`listening` fills; `greeted` is set at each);
        ConfigError naming the flag if one exits first, or after `timeout`."""
        ends = time.monotonic() + timeout
        while len(listening) < self.count:
            for index, process in self.processes.items():
                if process.poll() is not None:
                    raise ConfigError(f"--frontends: front end {index} exited with {process.returncode} as it started")
            if time.monotonic() > ends:
                raise ConfigError(
                    f"--frontends: {len(listening)} of {self.count} front ends listen after {timeout:.0f} s"
                )
            greeted.clear()
            try:
                await asyncio.wait_for(greeted.wait(), 0.2)
            except TimeoutError:
                continue  # look at the processes again

    def _spawn(self, index: int) -> subprocess.Popen:
        environment = {
            **os.environ,
            INDEX_VARIABLE: str(index),
            LINK_VARIABLE: self.link,
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_directory,
        }
        fds = ()
        if self.http is not None:
            environment[HTTP_FD_VARIABLE] = str(self.http.fileno())
            fds = (self.http.fileno(),)
        command = [sys.executable, "-m", "server.frontend.process", *self.argv, "--grpc-port", str(self.grpc_port)]
        command += ["--frontends", str(self.count)]  # `auto` as counted here
        self.started[index] = time.monotonic()
        return subprocess.Popen(command, env=environment, pass_fds=fds)

    async def supervise(self) -> None:
        """Restart a front end that exits while the server runs, later each time it dies again
        soon after starting. Stops only when cancelled."""
        while not self.stopping:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for index, process in self.processes.items():
                if index not in self.restarts and process.poll() is not None:
                    mark_process_dead(process.pid, self.metrics_directory)  # its open connections are gone
                    self.restarts[index] = now + self._pause(index)
                    pause = self.restarts[index] - now
                    log.error(
                        "front end %d (pid %d) exited with %d: restarting it in %.0f s",
                        *(index, process.pid, process.returncode, pause),
                    )
            for index, at in list(self.restarts.items()):
                if now >= at:
                    self._restart(index)

    def _pause(self, index: int) -> float:
        healthy = time.monotonic() - self.started[index] > HEALTHY_SECONDS
        deaths = self.deaths[index] = 1 if healthy else self.deaths.get(index, 0) + 1
        return RESTART_PAUSES[min(deaths, len(RESTART_PAUSES)) - 1]

    def _restart(self, index: int) -> None:
        try:
            self.processes[index] = self._spawn(index)
        except OSError as err:  # out of processes or memory: try again after the longest pause
            log.error("front end %d could not be restarted: %s", index, err)
            self.restarts[index] = time.monotonic() + RESTART_PAUSES[-1]
        else:
            del self.restarts[index]
            self.restarted += 1

    def pids(self) -> dict[int, int]:
        """Each running front end's number and process id."""
        return {index: process.pid for index, process in self.processes.items() if process.poll() is None}

    async def stop(self, timeout: float) -> None:
        """SIGTERM each: it stops taking requests and answers those it has (through the engine,
        which still serves); SIGKILL what is left after `timeout`."""
        self.stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        ends = time.monotonic() + timeout
        while any(p.poll() is None for p in self.processes.values()) and time.monotonic() < ends:
            await asyncio.sleep(0.05)
        for index, process in self.processes.items():
            if process.poll() is None:
                log.warning("front end %d did not stop within %.1f s: killed", index, timeout)
                process.kill()
                process.wait()
