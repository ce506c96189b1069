"""Bounds set once for the whole process: grpc core's channel arguments for what a gRPC connection
may hold, and the open-file limit that every listener's connections share.

grpc core bounds metadata (16 KiB, RESOURCE_EXHAUSTED past it) and ping floods (GOAWAY) by default,
but neither connections, idle connections, calls per connection, nor the wait for a new
connection's HTTP/2 preface (120 s): grpc_options() sets those. server/config_checks.py keeps each
of them within a C int, which grpc core's channel arguments are.
"""

import logging
import resource

from server.config import ServerSettings

log = logging.getLogger(__name__)

FILES_IN_RESERVE = 256  # model files, logs, grpc's own pipes and the like, besides the connections


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """grpc core channel arguments that bound what a connection may hold; grpc's defaults are unbounded."""
    options = [
        ("grpc.server_handshake_timeout_ms", round(settings.grpc_handshake_timeout_secs * 1000)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
    ]
    if settings.grpc_max_connection_idle_secs:
        options.append(("grpc.max_connection_idle_ms", round(settings.grpc_max_connection_idle_secs * 1000)))
    if settings.grpc_max_connections:
        options.append(("grpc.max_allowed_incoming_connections", settings.grpc_max_connections))
    return options


def ensure_open_files(settings: ServerSettings) -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does at start), and warn when it
    is below the connection caps: past it, connections fail in accept() instead of being refused."""
    http = settings.http_max_connections if settings.http_port >= 0 else 0
    wanted = http + settings.metrics_max_connections + settings.grpc_max_connections + FILES_IN_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.info("the open-file limit stays %d: raising it to %d failed: %s", soft, target, err)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-file limit (ulimit -n) is %d, below the connection caps plus %d in reserve (%d): past it, "
            "new connections fail instead of being refused; raise it, or lower --http-max-connections, "
            "--metrics-max-connections, --grpc-max-connections",
            soft,
            FILES_IN_RESERVE,
            wanted,
        )
    return soft
