"""A front-end process (`--frontends N`, N > 1): gRPC and REST over a Backend whose core, model
information and control are the engine's, across the link (link_client.py).

The engine's process starts each one as `python -m server.frontend.process` with the server's own
flags, the gRPC port it reserved (every front end binds it, with SO_REUSEPORT, and the kernel
spreads connections between them), REST's listening socket as an inherited descriptor, and the
link's path. It authenticates, decodes and encodes; the engine batches, runs and bills. It exits
non-zero when the link to the engine breaks, and drains on SIGTERM.
"""

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys

from prometheus_client import CollectorRegistry

from server import processes
from server.config import ServerSettings, parse_server_settings
from server.errors import ConfigError
from server.frontend.backend import Backend
from server.frontend.connection_limits import ConnectionMetrics
from server.frontend.grpc_server import start_grpc
from server.frontend.identity import Authenticator
from server.frontend.link_client import Link, RemoteControl, RemoteCore, RemoteInfo, RemoteTraces
from server.frontend.link_regions import RemoteRegions
from server.frontend.process_limits import ensure_open_files
from server.frontend.request_limits import Offload, RequestLimits
from server.observe import log_format
from server.observe.trace_config import trace_config

LINK_VARIABLE = "ONNXSERVE_FRONTEND_LINK"  # the engine's Unix socket
INDEX_VARIABLE = "ONNXSERVE_FRONTEND_INDEX"  # 1..N: in the log, the process title and the hello
HTTP_FD_VARIABLE = "ONNXSERVE_FRONTEND_HTTP_FD"  # REST's listening socket, inherited; absent with REST off
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LINK_LOST_EXIT_CODE = 5  # the engine went away: the server is down, and says so

log = logging.getLogger("onnxserve")


def share_of_bounds(settings: ServerSettings) -> ServerSettings:
    """The connection bounds are the server's: each of its front ends holds its share of them
    (rounded up; the kernel spreads connections about evenly, not exactly)."""
    count = settings.frontends

    def share(bound: int) -> int:
        return -(-bound // count) if bound else 0  # 0: no limit, in each

    return dataclasses.replace(
        settings,
        grpc_max_connections=share(settings.grpc_max_connections),
        http_max_connections=share(settings.http_max_connections),
    )


async def serve(settings: ServerSettings, index: int, path: str, http_fd: int | None) -> int:
    settings = share_of_bounds(settings)
    ensure_open_files(settings)
    connection = await Link.connect(path)
    auth = Authenticator(
        settings.api_keys,
        settings.trust_tenant_header,
        settings.grpc_use_ssl_mutual or settings.http_use_ssl_mutual,
        settings.max_tenant_series,
    )
    core = RemoteCore(connection, index)
    backend = Backend(
        core,
        RemoteInfo(connection),
        RemoteControl(connection),
        auth,
        RequestLimits.from_settings(settings),
        Offload(),
        RemoteRegions(connection),
        RemoteTraces(connection, bool(trace_config(settings.trace_config, os.environ).endpoint)),
        settings.id,
    )
    grpc = await start_grpc(settings, backend)
    await grpc.start()
    http, connections = None, ConnectionMetrics(CollectorRegistry())
    if http_fd is not None:
        from server.frontend.http_service import HttpApi, start_http

        api = HttpApi(backend, settings.http_restricted_api, settings.http_max_body_bytes)
        http = await start_http(settings, api, connections, socket.socket(fileno=http_fd))
    await connection.call("hello", index, os.getpid())
    processes.settle_heap()
    log.info("serving (pid %d): gRPC port %d%s", os.getpid(), grpc.port, ", REST" if http is not None else "")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    followers = [asyncio.create_task(grpc.mirror_readiness(connection.changed))]
    if settings.api_keys:
        followers.append(asyncio.create_task(auth.follow()))
    await asyncio.wait((asyncio.ensure_future(stop.wait()), connection.broken), return_when=asyncio.FIRST_COMPLETED)
    for task in followers:
        task.cancel()
    lost = connection.broken.done()
    await grpc.health.enter_graceful_shutdown()
    grace = 0 if lost else settings.exit_timeout_secs  # without the engine, nothing in flight can be answered
    await asyncio.gather(grpc.server.stop(grace), *([http.shutdown()] if http else []))
    backend.offload.close()
    return LINK_LOST_EXIT_CODE if lost else 0


def die_with_the_engine() -> None:
    """The kernel sends this process SIGTERM when the engine's process ends, SIGKILL included
    (prctl PR_SET_PDEATHSIG), so that no front end outlives it holding the gRPC port."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        logging.getLogger(__name__).warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def main() -> int:
    die_with_the_engine()
    index = int(os.environ[INDEX_VARIABLE])
    processes.set_title(f"frontend {index}")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s frontend {index} %(name)s: %(message)s")
    try:
        settings = parse_server_settings(sys.argv[1:])
    except ConfigError as err:
        print(f"onnxserve frontend {index}: {err}", file=sys.stderr)
        return 2
    log_format.configure(settings.log_level, settings.log_format, f"frontend {index}")
    fd = os.environ.get(HTTP_FD_VARIABLE)
    return asyncio.run(serve(settings, index, os.environ[LINK_VARIABLE], int(fd) if fd else None))


if __name__ == "__main__":
    sys.exit(main())
