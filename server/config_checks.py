"""The checks ServerSettings (server/config.py) makes of its values, each error naming the flag.

Every float must be finite and within its range: argparse's float() takes "nan" and "inf", and NaN
passes every one-sided test (`nan < 0` is false). Every integer that grpc core or setrlimit takes
must fit its C type, or the start fails with a traceback (grpc.aio.server's OverflowError, exit 1)
instead of a usage error (exit 2). Caps that size nothing (--http-max-body-bytes,
--usage-log-max-bytes, --max-tenant-series) have a lower bound only: a huge one means no cap.
"""

import math
import os
from typing import TYPE_CHECKING

from server.errors import ConfigError
from server.models.model_limits import MAX_BATCH_SIZE, MAX_QUEUE_SIZE, at_most

if TYPE_CHECKING:
    from server.config import ServerSettings

MIB = 1024 * 1024
CONTROL_MODES = ("none", "poll", "explicit")  # --model-control-mode
C_INT_MAX = 2**31 - 1  # grpc core's channel arguments are C ints
# Records waiting for the disk: each holds a tuple of 18 fields, about half a KB in memory, so 2^20
# records (16 times the default) are about 512 MiB: more than any disk stall is worth.
MAX_USAGE_LOG_BUFFER_RECORDS = 1 << 20
# A day: TensorRT engine builds of large models take tens of minutes; a load that runs longer hangs.
MAX_MODEL_LOAD_TIMEOUT_SECS = 86400
# Open connections of one listener: Linux's default cap on one process's file descriptors
# (fs.nr_open). The open-file limit is raised to the caps' sum at start, and setrlimit overflows
# past a C long.
MAX_CONNECTIONS = 1 << 20
# A wait for a client, or for the server's own requests at exit: an hour is longer than any
# client or orchestrator waits (Kubernetes gives a pod 30 s to stop by default).
MAX_WAIT_SECS = 3600.0
# The gRPC idle timeout goes to grpc core in milliseconds, as a C int: 24.8 days at most.
MAX_GRPC_IDLE_SECS = C_INT_MAX // 1000
# Seconds settings -> (lowest, highest, whether the lowest itself is allowed, what it means).
SECONDS = {
    "http_header_timeout_secs": (0.0, MAX_WAIT_SECS, False, ""),
    "http_body_timeout_secs": (0.0, MAX_WAIT_SECS, False, ""),
    "metrics_header_timeout_secs": (0.0, MAX_WAIT_SECS, False, ""),
    "grpc_handshake_timeout_secs": (0.0, MAX_WAIT_SECS, False, ""),
    "grpc_max_connection_idle_secs": (0.0, MAX_GRPC_IDLE_SECS, True, " (0: never)"),
    "exit_timeout_secs": (0.0, MAX_WAIT_SECS, True, ""),
    "repository_poll_secs": (0.0, 86400.0, False, ""),
    "log_repeat_secs": (0.0, 86400.0, True, " (0 logs every line)"),
    "model_load_timeout_secs": (0.0, MAX_MODEL_LOAD_TIMEOUT_SECS, False, ""),
}
# Integer settings with a range of their own -> (lowest, highest).
INTEGERS = {
    "grpc_max_concurrent_streams": (1, C_INT_MAX),
    "max_bytes_elements": (1, C_INT_MAX),
    "max_json_values": (1, C_INT_MAX),
    "max_typed_elements": (1, C_INT_MAX),
    "max_id_bytes": (1, 65536),
    "max_request_parameters": (0, 65536),
    "usage_log_fsync_ms": (1, 60000),
}


def check_settings(settings: "ServerSettings") -> None:
    """ConfigError for the first value of `settings` that is out of its range or inconsistent."""
    _check_numbers(settings)
    _check_choices(settings)
    for transport in ("grpc", "http", "metrics"):
        _check_tls(settings, transport)
    _check_files(settings)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(settings: "ServerSettings") -> None:
    for name in ("grpc_port", "metrics_port"):
        if not 0 <= (port := getattr(settings, name)) <= 65535:
            raise ConfigError(f"{flag(name)}: {port} is not a port number (0-65535)")
    if not -1 <= settings.http_port <= 65535:
        raise ConfigError(f"--http-port: {settings.http_port} is not a port number (0-65535), nor -1 (HTTP off)")
    for name, (low, high, low_allowed, meaning) in SECONDS.items():
        value = getattr(settings, name)
        if not (math.isfinite(value) and (low <= value if low_allowed else low < value) and value <= high):
            raise ConfigError(
                f"{flag(name)}: {value} is outside {'[' if low_allowed else '('}{low:g}, {high:.0f}]{meaning}"
            )
    for name, (low, high) in INTEGERS.items():
        if not low <= (value := getattr(settings, name)) <= high:
            raise ConfigError(f"{flag(name)}: {value} is outside {low} .. {high}")
    if settings.http_max_body_bytes < 1024:
        raise ConfigError(f"--http-max-body-bytes: {settings.http_max_body_bytes} is below 1024")
    if not 4 * MIB <= settings.grpc_max_message_bytes <= C_INT_MAX:
        raise ConfigError(f"--grpc-max-message-bytes: {settings.grpc_max_message_bytes} is outside 4 MiB .. 2 GiB")
    if not 1024 <= settings.http_max_header_bytes <= 64 * MIB:
        raise ConfigError(f"--http-max-header-bytes: {settings.http_max_header_bytes} is outside 1024 .. 64 MiB")
    if not 64 <= settings.http_max_url_bytes <= settings.http_max_header_bytes:
        raise ConfigError(
            f"--http-max-url-bytes: {settings.http_max_url_bytes} is outside 64 .. --http-max-header-bytes"
        )
    _check_counts(settings)


MAX_FRONTENDS = 256  # processes: more than any node's cores


def _check_counts(settings: "ServerSettings") -> None:
    """Caps on things counted: at least one (or 0 where that means none), at most onnxserve's limit."""
    for name in (
        "http_max_connections",
        "metrics_max_connections",
        "max_tenant_series",
        "usage_log_buffer_records",
        "default_max_batch_size",
    ):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{flag(name)}: {getattr(settings, name)} must be >= 1")
    for name, meaning in (
        ("grpc_max_connections", "no limit"),
        ("default_max_queue_size", "unbounded"),
        ("frontends", "auto"),
    ):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{flag(name)}: {getattr(settings, name)} is negative (0: {meaning})")
    for name in ("http_max_connections", "metrics_max_connections", "grpc_max_connections"):
        at_most(getattr(settings, name), MAX_CONNECTIONS, "settings", flag(name))
    at_most(settings.default_max_batch_size, MAX_BATCH_SIZE, "settings", "--default-max-batch-size")
    at_most(settings.frontends, MAX_FRONTENDS, "settings", "--frontends")
    at_most(settings.default_max_queue_size, MAX_QUEUE_SIZE, "settings", "--default-max-queue-size")
    at_most(settings.usage_log_buffer_records, MAX_USAGE_LOG_BUFFER_RECORDS, "settings", "--usage-log-buffer-records")
    if settings.usage_log_max_bytes and settings.usage_log_max_bytes < 4096:
        raise ConfigError(f"--usage-log-max-bytes: {settings.usage_log_max_bytes} is below 4096 (0 never rotates)")


def _check_choices(settings: "ServerSettings") -> None:
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level: {settings.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"--log-format: {settings.log_format!r} is not text or json")
    devices = [price.device for price in settings.device_price]
    if len(set(devices)) != len(devices):
        raise ConfigError(f"--device-price: a device is priced twice: {devices}")
    if settings.model_control_mode not in CONTROL_MODES:
        raise ConfigError(f"--model-control-mode: {settings.model_control_mode!r} is not one of {CONTROL_MODES}")
    if settings.load_model and settings.model_control_mode != "explicit":
        raise ConfigError(
            f"--load-model: {list(settings.load_model)} needs --model-control-mode explicit "
            f"(mode {settings.model_control_mode} loads every model)"
        )
    for name in ("grpc_restricted_protocol", "http_restricted_api"):
        restricted = [method for rule in getattr(settings, name) for method in rule.methods]
        if len(set(restricted)) != len(restricted):
            raise ConfigError(f"{flag(name)}: a protocol group is restricted twice")


def _check_tls(settings: "ServerSettings", transport: str) -> None:
    """TLS of one endpoint: the files it needs are named and readable (their PEM is read at start)."""
    use = getattr(settings, f"{transport}_use_ssl") or getattr(settings, f"{transport}_use_ssl_mutual", False)
    needed = ["server_cert", "server_key"] + (
        ["root_cert"] if getattr(settings, f"{transport}_use_ssl_mutual", False) else []
    )
    for name in needed if use else ():
        option, path = flag(f"{transport}_{name}"), getattr(settings, f"{transport}_{name}")
        if not path:
            raise ConfigError(f"{option}: needed by --{transport}-use-ssl{'-mutual' if name == 'root_cert' else ''}")
        if not os.access(path, os.R_OK) or not os.path.isfile(path):
            raise ConfigError(f"{option}: {path} is not a readable file")


def _check_files(settings: "ServerSettings") -> None:
    if settings.tensorrt_cache_dir and not os.access(settings.tensorrt_cache_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--tensorrt-cache-dir: {settings.tensorrt_cache_dir} is not a writable directory")
    if settings.api_keys and not os.path.isfile(settings.api_keys):
        raise ConfigError(f"--api-keys: {settings.api_keys} is not a file")
    if settings.usage_log and os.path.isdir(settings.usage_log):
        raise ConfigError(f"--usage-log: {settings.usage_log} is a directory; name a file in it")
    if not settings.model_repository.is_dir():
        raise ConfigError(f"--model-repository: {settings.model_repository} is not a directory")
