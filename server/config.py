"""The server's settings, declared once: each field gives its flag, its environment variable and
its help. A model's own settings (config.pbtxt) are server/models/model_config.py's.

Values are parsed here, validated (server/config_checks.py), then frozen. Errors name the flag
that is wrong.
"""

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from server.config_checks import MIB, check_settings, flag
from server.errors import ConfigError

ENV_PREFIX = "ONNXSERVE_"
AUTO = "auto"  # --frontends auto, held as 0 until the server counts its cores (server/frontends.py)


def _flag(help_text: str) -> dict:
    return {"help": help_text}


def _count_or_auto(text: str) -> int:
    """A count, or `auto` as 0."""
    if text.strip().lower() == AUTO:
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor {AUTO!r}") from None


@dataclass(frozen=True)
class DevicePriceSetting:
    """`--device-price cuda:0=4.10`: what one device costs per hour, and where that was said."""

    device: str  # "cpu" or "cuda:N"
    dollars_per_hour: float
    source: str  # "flag" or "env"

    @classmethod
    def parse(cls, text: str, source: str, where: str) -> "DevicePriceSetting":
        device, separator, price = text.strip().partition("=")
        device = device.strip().lower()
        valid_device = device == "cpu" or (device.startswith("cuda:") and device[5:].isdigit())
        try:
            dollars = float(price)
        except ValueError:
            dollars = -1.0
        if not separator or not valid_device or not dollars >= 0 or dollars == float("inf"):
            raise ConfigError(
                f"{where}: {text!r} is not DEVICE=DOLLARS_PER_HOUR with DEVICE cpu or cuda:N and a price >= 0"
            )
        return cls(device, dollars, source)


# Triton's RPC groups for --grpc-restricted-protocol, and the v2 RPCs in each.
PROTOCOL_GROUPS = {
    "health": ("ServerLive", "ServerReady", "ModelReady"),
    "metadata": ("ServerMetadata", "ModelMetadata"),
    "inference": ("ModelInfer", "ModelStreamInfer"),
    "shared-memory": (
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    ),
    "model-config": ("ModelConfig",),
    "model-repository": ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    "statistics": ("ModelStatistics",),
    "trace": ("TraceSetting",),
    "logging": ("LogSettings",),
}


@dataclass(frozen=True)
class RestrictedProtocol:
    """`--grpc-restricted-protocol model-repository,statistics:admin-key=secret`: those RPCs
    answer PERMISSION_DENIED unless the call carries metadata admin-key: secret."""

    groups: tuple[str, ...]
    header: str  # lower case: gRPC metadata keys are
    value: str

    @classmethod
    def parse(cls, text: str, source: str, where: str) -> "RestrictedProtocol":
        groups, _, restriction = text.strip().partition(":")
        header, equals, value = restriction.partition("=")
        names = tuple(name.strip() for name in groups.split(",") if name.strip())
        unknown = [name for name in names if name not in PROTOCOL_GROUPS]
        if not names or unknown or not equals or not header.strip() or not value:
            raise ConfigError(
                f"{where}: {text!r} is not GROUP[,GROUP...]:HEADER=VALUE with groups from {sorted(PROTOCOL_GROUPS)}"
            )
        return cls(names, header.strip().lower(), value)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(method for group in self.groups for method in PROTOCOL_GROUPS[group])


@dataclass(frozen=True)
class ServerSettings:
    """Process-wide settings. Each field is a flag (--model-repository) and an
    environment variable (ONNXSERVE_MODEL_REPOSITORY); the flag wins."""

    model_repository: Path = field(
        default=Path("models"), metadata=_flag("model repository: <repo>/<model>/<version>/model.onnx")
    )
    id: str = field(
        default="onnxserve",
        metadata=_flag(
            "the server's name in its metadata, as Triton's --id (NVIDIA's example programs look for 'triton')"
        ),
    )
    grpc_address: str = field(default="0.0.0.0", metadata=_flag("address the gRPC server binds"))
    grpc_port: int = field(default=8001, metadata=_flag("gRPC port; 0 picks a free one"))
    http_address: str = field(default="0.0.0.0", metadata=_flag("address the HTTP/REST server binds"))
    http_port: int = field(default=8000, metadata=_flag("HTTP/REST port; 0 picks a free one; -1 turns HTTP off"))
    frontends: int = field(
        default=1,
        metadata={
            **_flag(
                "processes that serve gRPC and REST over one engine process (models, batching, cost); "
                "1: one process, no link between processes; auto: by the cores this process may use"
            ),
            "parse": _count_or_auto,
        },
    )
    http_max_body_bytes: int = field(default=256 * MIB, metadata=_flag("largest HTTP request body accepted, in bytes"))
    http_max_header_bytes: int = field(
        default=64 * 1024,
        metadata=_flag("REST and /metrics: largest request line plus headers, in bytes; more is refused with 431"),
    )
    http_max_url_bytes: int = field(
        default=8 * 1024,
        metadata=_flag("REST and /metrics: longest URL (path and query), in bytes; longer is refused with 414"),
    )
    http_header_timeout_secs: float = field(
        default=10.0,
        metadata=_flag(
            "REST: seconds a request's line and headers may take, from the connection's start (TLS "
            "handshake included) or the request's first byte; then the connection is closed"
        ),
    )
    http_body_timeout_secs: float = field(
        default=30.0,
        metadata=_flag("REST: seconds a request body may take after its headers, plus one second per MiB received"),
    )
    http_max_connections: int = field(
        default=1000, metadata=_flag("REST: open connections at most; more are refused (503) and counted")
    )
    metrics_address: str = field(default="0.0.0.0", metadata=_flag("address of the /metrics endpoint"))
    metrics_port: int = field(default=8002, metadata=_flag("Prometheus /metrics port; 0 picks a free one"))
    metrics_header_timeout_secs: float = field(
        default=10.0, metadata=_flag("/metrics: seconds a request may take to arrive (TLS handshake included)")
    )
    metrics_max_connections: int = field(
        default=100, metadata=_flag("/metrics: open connections at most; more are refused (503) and counted")
    )
    grpc_max_message_bytes: int = field(
        default=256 * MIB, metadata=_flag("largest gRPC message accepted or sent, in bytes")
    )
    grpc_handshake_timeout_secs: float = field(
        default=10.0, metadata=_flag("gRPC: seconds a new connection may take to say HTTP/2 (TLS handshake included)")
    )
    grpc_max_connection_idle_secs: float = field(
        default=300.0, metadata=_flag("gRPC: a connection with no call for this long is closed (GOAWAY); 0: never")
    )
    grpc_max_connections: int = field(
        default=1000, metadata=_flag("gRPC: open connections at most; more are closed at once; 0: no limit")
    )
    grpc_max_concurrent_streams: int = field(
        default=1000, metadata=_flag("gRPC: calls in flight on one connection at most; clients queue the rest")
    )
    max_bytes_elements: int = field(
        default=1 << 20,
        metadata=_flag(
            "BYTES elements one inference request may declare, all its inputs together; each costs "
            "~200 bytes of Python and onnxruntime strings however short it is on the wire"
        ),
    )
    max_json_values: int = field(
        default=1 << 21,
        metadata=_flag(
            "REST: values one inference request's JSON may hold (counted as its commas, before it is "
            "parsed); each costs ~50 bytes of Python: send big tensors as binary data"
        ),
    )
    max_typed_elements: int = field(
        default=1 << 24,
        metadata=_flag(
            "gRPC: numeric values in one inference request's typed contents (int_contents, "
            "fp32_contents...), all its inputs together; raw_input_contents have no such cap"
        ),
    )
    max_id_bytes: int = field(default=256, metadata=_flag("longest inference request 'id', in bytes (UTF-8)"))
    max_request_parameters: int = field(
        default=64, metadata=_flag("entries in one inference request's 'parameters' at most")
    )
    exit_timeout_secs: float = field(
        default=20.0, metadata=_flag("on SIGTERM, how long in-flight requests and loads may take before exit")
    )
    strict_readiness: bool = field(
        default=True, metadata=_flag("ready only when every model is ready (false: when loading is done)")
    )
    default_max_batch_size: int = field(
        default=32, metadata=_flag("max_batch_size for a batchable model whose config does not set it")
    )
    require_gpu: bool = field(
        default=False,
        metadata=_flag("a model that asks for a GPU (KIND_GPU, an accelerator) and cannot have one fails to load"),
    )
    tensorrt_cache_dir: str = field(
        default="",
        metadata=_flag("writable directory for TensorRT engine and timing caches, reused across restarts; empty: none"),
    )
    log_level: str = field(default="INFO", metadata=_flag("DEBUG, INFO, WARNING or ERROR"))
    log_format: str = field(
        default="text", metadata=_flag("text, or json: one JSON object a line, with trace and span ids where traced")
    )
    trace_config: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "Triton's trace settings: mode=opentelemetry, rate=N (one request in N), level=OFF|TIMESTAMPS, "
            "opentelemetry,url=URL, opentelemetry,resource=KEY=VALUE; repeatable; they win over OTEL_* variables; "
            "the environment variable takes a ';'-separated list"
        ),
    )
    log_repeat_secs: float = field(
        default=60.0,
        metadata=_flag(
            "a warning or error repeated word for word is logged once per this many seconds, with a "
            "count of the lines left out; 0 logs every one"
        ),
    )
    device_price: tuple[DevicePriceSetting, ...] = field(
        default=(),
        metadata=_flag(
            "price of a device in dollars per hour, DEVICE=DOLLARS (cpu=0.17, cuda:0=4.10); repeatable; "
            "the environment variable takes a comma-separated list"
        ),
    )

    model_control_mode: str = field(
        default="none",
        metadata=_flag(
            "none: load every model at start, no changes; explicit: load --load-model models at start, then "
            "RepositoryModelLoad/Unload; poll: load every model, then follow the repository's changes"
        ),
    )
    repository_poll_secs: float = field(
        default=15.0, metadata=_flag("poll mode: seconds between scans of the repository")
    )
    load_model: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "explicit mode: a model to load at start, '*' for all (none given: none load); repeatable; "
            "the environment variable takes a comma-separated list"
        ),
    )
    http_restricted_api: tuple[RestrictedProtocol, ...] = field(
        default=(),
        metadata=_flag(
            "GROUP[,GROUP]:HEADER=VALUE: those API groups (e.g. model-repository) need that HTTP header; "
            "repeatable; the environment variable takes a ';'-separated list"
        ),
    )
    grpc_restricted_protocol: tuple[RestrictedProtocol, ...] = field(
        default=(),
        metadata=_flag(
            "GROUP[,GROUP]:HEADER=VALUE: those RPC groups (e.g. model-repository) need that metadata; "
            "repeatable; the environment variable takes a ';'-separated list"
        ),
    )

    grpc_use_ssl: bool = field(
        default=False, metadata=_flag("serve gRPC over TLS (needs --grpc-server-cert and --grpc-server-key)")
    )
    grpc_use_ssl_mutual: bool = field(
        default=False,
        metadata=_flag("serve gRPC over mutual TLS: clients must present a certificate signed by --grpc-root-cert"),
    )
    grpc_server_cert: str = field(default="", metadata=_flag("PEM file: the gRPC server's certificate chain"))
    grpc_server_key: str = field(default="", metadata=_flag("PEM file: the gRPC server's private key"))
    grpc_root_cert: str = field(
        default="", metadata=_flag("PEM file: CA certificates that sign client certificates (mutual TLS)")
    )
    http_use_ssl: bool = field(
        default=False, metadata=_flag("serve REST over TLS (needs --http-server-cert and --http-server-key)")
    )
    http_use_ssl_mutual: bool = field(
        default=False,
        metadata=_flag("serve REST over mutual TLS: clients must present a certificate signed by --http-root-cert"),
    )
    http_server_cert: str = field(default="", metadata=_flag("PEM file: the REST server's certificate chain"))
    http_server_key: str = field(default="", metadata=_flag("PEM file: the REST server's private key"))
    http_root_cert: str = field(
        default="", metadata=_flag("PEM file: CA certificates that sign client certificates (mutual TLS)")
    )
    metrics_use_ssl: bool = field(
        default=False, metadata=_flag("serve /metrics over TLS (needs --metrics-server-cert and -key)")
    )
    metrics_server_cert: str = field(default="", metadata=_flag("PEM file: the /metrics endpoint's certificate chain"))
    metrics_server_key: str = field(default="", metadata=_flag("PEM file: the /metrics endpoint's private key"))
    api_keys: str = field(
        default="",
        metadata=_flag(
            "JSON file of API key hashes (sha256) and their tenants; inference and admin calls then need "
            "'authorization: Bearer <key>'; re-read when it changes"
        ),
    )
    trust_tenant_header: bool = field(
        default=False,
        metadata=_flag("take the tenant from the x-tenant-id header or metadata (only behind a gateway that sets it)"),
    )
    max_tenant_series: int = field(
        default=100, metadata=_flag('tenants with series of their own on /metrics; later ones count as tenant="other"')
    )
    usage_log: str = field(default="", metadata=_flag("file to append one JSON usage record per finished request to"))
    tenant_limits: str = field(
        default="",
        metadata=_flag(
            "YAML or JSON file of each tenant's budgets, rates, in-flight cap, priority and weight (a `default` "
            "entry for the rest); re-read when it changes"
        ),
    )
    usage_log_fsync_ms: int = field(
        default=200, metadata=_flag("usage log: milliseconds between fsyncs (the most a crash loses)")
    )
    usage_log_max_bytes: int = field(
        default=100 * MIB,
        metadata=_flag("usage log: rotate to PATH.N (numbered upwards) past this size; 0 never rotates"),
    )
    usage_log_buffer_records: int = field(
        default=65536,
        metadata=_flag(
            "usage log: records waiting for the disk, at most; when full, new requests are refused (UNAVAILABLE)"
        ),
    )
    default_max_queue_size: int = field(
        default=10000,
        metadata=_flag(
            "max_queue_size of a model whose config sets none (0, Triton's unbounded): requests waiting "
            "beyond it are refused with UNAVAILABLE; 0 keeps such queues unbounded"
        ),
    )
    model_load_timeout_secs: float = field(
        default=1800.0,
        metadata=_flag(
            "a model version's load (sessions, TensorRT engine, calibration, warm-up) that takes longer "
            "fails, and what it built is freed"
        ),
    )

    def __post_init__(self) -> None:
        check_settings(self)  # server/config_checks.py: ConfigError naming the flag


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


_PARSERS = {Path: Path, str: str, int: int, float: float, bool: _parse_bool}


def _parser(spec):
    return spec.metadata.get("parse", _PARSERS[spec.type])


# Repeatable flags: (parse one item, separator of the environment variable's list)
_REPEATED = {
    "device_price": (DevicePriceSetting.parse, ","),
    "load_model": (lambda text, source, where: text.strip(), ","),
    "grpc_restricted_protocol": (RestrictedProtocol.parse, ";"),
    "http_restricted_api": (RestrictedProtocol.parse, ";"),
    "trace_config": (lambda text, source, where: text.strip(), ";"),
}


def parse_server_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> ServerSettings:
    """Flags first, then ONNXSERVE_* environment variables, then defaults."""
    parser = argparse.ArgumentParser(prog="onnxserve", description="KServe v2 gRPC server for ONNX models")
    for spec in fields(ServerSettings):
        env_name = ENV_PREFIX + spec.name.upper()
        repeated = spec.name in _REPEATED
        parser.add_argument(
            flag(spec.name),
            dest=spec.name,
            type=str if repeated else _parser(spec),
            action="append" if repeated else "store",
            default=None,
            help=f"{spec.metadata['help']} (env {env_name}, default {spec.default})",
            **({"nargs": "?", "const": True} if spec.type is bool else {}),  # `--grpc-use-ssl` alone means true
        )
    parsed = vars(parser.parse_args(list(argv)))
    values = {}
    for spec in fields(ServerSettings):
        if spec.name in _REPEATED:
            values[spec.name] = _repeated(spec.name, parsed[spec.name], environ)
            continue
        if parsed[spec.name] is not None:
            values[spec.name] = parsed[spec.name]
            continue
        env_name = ENV_PREFIX + spec.name.upper()
        if env_name in environ:
            try:
                values[spec.name] = _parser(spec)(environ[env_name])
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigError(f"{env_name}: {err}") from None
    return ServerSettings(**values)


def _repeated(name: str, flags: list[str] | None, environ: Mapping[str, str]) -> tuple:
    parse, separator = _REPEATED[name]
    if flags is not None:
        return tuple(parse(text, "flag", flag(name)) for text in flags)
    env_name = ENV_PREFIX + name.upper()
    items = [item for item in environ.get(env_name, "").split(separator) if item.strip()]
    return tuple(parse(item, "env", env_name) for item in items)
