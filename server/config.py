"""Every setting onnxserve reads, declared once: server flags/env and per-model config.pbtxt.

Values are parsed and validated here, then frozen. Errors name the flag, or the
file and field, that is wrong.
"""

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

from google.protobuf import text_format

from server import protocol
from server.errors import ConfigError

MIB = 1024 * 1024
ENV_PREFIX = "ONNXSERVE_"


def _flag(help_text: str) -> dict:
    return {"help": help_text}


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


@dataclass(frozen=True)
class ServerSettings:
    """Process-wide settings. Each field is a flag (--model-repository) and an
    environment variable (ONNXSERVE_MODEL_REPOSITORY); the flag wins."""

    model_repository: Path = field(
        default=Path("models"), metadata=_flag("model repository: <repo>/<model>/<version>/model.onnx")
    )
    grpc_address: str = field(default="0.0.0.0", metadata=_flag("address the gRPC server binds"))
    grpc_port: int = field(default=8001, metadata=_flag("gRPC port; 0 picks a free one"))
    metrics_address: str = field(default="0.0.0.0", metadata=_flag("address of the /metrics endpoint"))
    metrics_port: int = field(default=8002, metadata=_flag("Prometheus /metrics port; 0 picks a free one"))
    grpc_max_message_bytes: int = field(
        default=256 * MIB, metadata=_flag("largest gRPC message accepted or sent, in bytes")
    )
    exit_timeout_secs: float = field(
        default=20.0, metadata=_flag("on SIGTERM, how long in-flight requests may take before exit")
    )
    strict_readiness: bool = field(
        default=True, metadata=_flag("ready only when every model is ready (false: when loading is done)")
    )
    default_max_batch_size: int = field(
        default=32, metadata=_flag("max_batch_size for a batchable model whose config does not set it")
    )
    log_level: str = field(default="INFO", metadata=_flag("DEBUG, INFO, WARNING or ERROR"))
    device_price: tuple[DevicePriceSetting, ...] = field(
        default=(),
        metadata=_flag(
            "price of a device in dollars per hour, DEVICE=DOLLARS (cpu=0.17, cuda:0=4.10); repeatable; "
            "the environment variable takes a comma-separated list"
        ),
    )

    def __post_init__(self) -> None:
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"--{_dashed(name)}: {port} is not a port number (0-65535)")
        if self.grpc_max_message_bytes < 4 * MIB or self.grpc_max_message_bytes > 2**31 - 1:
            raise ConfigError(
                f"--grpc-max-message-bytes: {self.grpc_max_message_bytes} is outside 4 MiB .. 2 GiB"
            )
        if self.exit_timeout_secs < 0:
            raise ConfigError(f"--exit-timeout-secs: {self.exit_timeout_secs} is negative")
        if self.default_max_batch_size < 1:
            raise ConfigError(f"--default-max-batch-size: {self.default_max_batch_size} must be >= 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        devices = [price.device for price in self.device_price]
        if len(set(devices)) != len(devices):
            raise ConfigError(f"--device-price: a device is priced twice: {devices}")
        if not self.model_repository.is_dir():
            raise ConfigError(f"--model-repository: {self.model_repository} is not a directory")


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


_PARSERS = {Path: Path, str: str, int: int, float: float, bool: _parse_bool}


def parse_server_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> ServerSettings:
    """Flags first, then ONNXSERVE_* environment variables, then defaults."""
    parser = argparse.ArgumentParser(prog="onnxserve", description="KServe v2 gRPC server for ONNX models")
    for spec in fields(ServerSettings):
        env_name = ENV_PREFIX + spec.name.upper()
        repeated = spec.name == "device_price"
        parser.add_argument(
            f"--{_dashed(spec.name)}",
            dest=spec.name,
            type=str if repeated else _PARSERS[spec.type],
            action="append" if repeated else "store",
            default=None,
            help=f"{spec.metadata['help']} (env {env_name}, default {spec.default})",
        )
    parsed = vars(parser.parse_args(list(argv)))
    values = {}
    for spec in fields(ServerSettings):
        if spec.name == "device_price":
            continue
        if parsed[spec.name] is not None:
            values[spec.name] = parsed[spec.name]
            continue
        env_name = ENV_PREFIX + spec.name.upper()
        if env_name in environ:
            try:
                values[spec.name] = _PARSERS[spec.type](environ[env_name])
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigError(f"{env_name}: {err}") from None
    values["device_price"] = _device_prices(parsed["device_price"], environ)
    return ServerSettings(**values)


def _device_prices(flags: list[str] | None, environ: Mapping[str, str]) -> tuple[DevicePriceSetting, ...]:
    if flags is not None:
        return tuple(DevicePriceSetting.parse(text, "flag", "--device-price") for text in flags)
    env_name = ENV_PREFIX + "DEVICE_PRICE"
    items = [item for item in environ.get(env_name, "").split(",") if item.strip()]
    return tuple(DevicePriceSetting.parse(item, "env", env_name) for item in items)


# --- per-model configuration (config.pbtxt) -------------------------------------------------


@dataclass(frozen=True)
class TensorConfig:
    """A model input or output as the server exposes it."""

    name: str
    datatype: str  # wire datatype: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 = variable


@dataclass(frozen=True)
class QueuePolicy:
    max_queue_size: int = 0
    """Requests waiting at most; 0 = unbounded. A full queue refuses at once (UNAVAILABLE)."""
    default_timeout_us: int = 0
    """Longest wait in the queue before DEADLINE_EXCEEDED; 0 = none."""
    allow_timeout_override: bool = False
    """Whether a request's `timeout` parameter may shorten the default timeout."""


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = 0
    """Rows per execution; 0 = the model has no batch dimension and is never batched."""
    max_queue_delay_us: int = 0
    """How long the oldest queued request may wait for a fuller batch."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes to send as soon as they can be formed."""
    priority_levels: int = 0
    """Number of priority levels (1 = highest); 0 = one level, the `priority` parameter is ignored."""
    default_priority_level: int = 0
    """Level of a request that sets no priority; 0 = the lowest level."""
    queue_policy: QueuePolicy = QueuePolicy()
    adaptive_delay_us: int = 1000
    """With max_queue_delay_us 0: while callers overlap (a request arrives before an earlier
    caller has collected its answer), the oldest request may wait this long for a fuller batch;
    a lone caller never waits. 0 = never wait. (config.pbtxt parameter `adaptive_queue_delay_us`)"""


@dataclass(frozen=True)
class Accelerator:
    """An execution provider asked for in optimization.execution_accelerators."""

    name: str  # "tensorrt" or "cuda"
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime session and instance placement."""

    instance_kind: str = "auto"
    """auto (GPU when one is visible, else CPU), gpu or cpu."""
    instance_count: int = 1
    """Sessions per device: that many batches run at once."""
    gpus: tuple[int, ...] = ()
    """GPU ids to place instances on; empty = GPU 0."""
    intra_op_threads: int = 0
    """Threads inside one operator; 0 = chosen by measurement at load (see calibration.py)."""
    inter_op_threads: int = 1
    """Threads across operators (sequential execution uses 1)."""
    graph_optimization_level: int = 99
    """onnxruntime graph optimization level: 0 disable, 1 basic, 2 extended, 99 all."""
    inline_run_below_us: int | None = None
    """Batches whose measured run time stays below this run on the event loop, not the instance's
    thread (whose handoff costs tens of us of CPU); 0 = always the thread; None = chosen at load:
    on the loop when the model ran faster than a measured handoff. A slow batch run inline stalls
    every other request, so a measured run above the limit sends the model back to its thread."""
    allow_spinning: bool | None = None
    """Whether onnxruntime's intra-op threads spin between runs; None = chosen at load."""
    gpu_accelerators: tuple[Accelerator, ...] = ()


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # latest, all, specific
    count: int = 1  # with latest
    versions: tuple[int, ...] = ()  # with specific

    def select(self, available: Sequence[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.count :]


@dataclass(frozen=True)
class ModelSettings:
    """A model's configuration as written in config.pbtxt, or the defaults without one.

    inputs/outputs may be partial or empty, and max_batch_size None: the
    repository completes them from the ONNX graph."""

    name: str
    source: str  # the config.pbtxt path, or "(no config.pbtxt)"
    max_batch_size: int | None = None
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    batching: BatchingSettings = BatchingSettings()
    session: SessionSettings = SessionSettings()
    version_policy: VersionPolicy = VersionPolicy()
    model_filename: str = "model.onnx"


WIRE_BY_CONFIG_TYPE = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
CONFIG_TYPE_BY_WIRE = {wire: name for name, wire in WIRE_BY_CONFIG_TYPE.items()}
KIND_NAMES = {"KIND_AUTO": "auto", "KIND_GPU": "gpu", "KIND_CPU": "cpu"}
# config.pbtxt `parameters` (string values holding non-negative integers) -> SessionSettings fields
SESSION_PARAMETERS = {
    "intra_op_thread_count": "intra_op_threads",
    "inter_op_thread_count": "inter_op_threads",
    "inline_run_below_us": "inline_run_below_us",
    "allow_spinning": "allow_spinning",
}
BATCHING_PARAMETERS = {"adaptive_queue_delay_us": "adaptive_delay_us"}
BOOLEAN_PARAMETERS = {"0": False, "1": True, "false": False, "true": True}
GPU_ACCELERATORS = ("tensorrt", "cuda")
ONNX_PLATFORMS = ("", "onnxruntime_onnx")
ONNX_BACKENDS = ("", "onnxruntime")


def load_model_settings(model_dir: Path) -> ModelSettings:
    """Read <model_dir>/config.pbtxt if there is one; ConfigError names file and field."""
    path = model_dir / "config.pbtxt"
    if not path.exists():
        return ModelSettings(name=model_dir.name, source="(no config.pbtxt)")
    try:
        proto = text_format.Parse(path.read_text(), protocol.ModelConfig())
    except text_format.ParseError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    return settings_from_proto(proto, path, model_dir.name)


def settings_from_proto(proto, path: Path, model_name: str) -> ModelSettings:
    where = str(path)
    if proto.name and proto.name != model_name:
        raise ConfigError(f"{where}: name: {proto.name!r} differs from the directory name {model_name!r}")
    if proto.platform not in ONNX_PLATFORMS:
        raise ConfigError(f"{where}: platform: {proto.platform!r} is not onnxruntime_onnx")
    if proto.backend not in ONNX_BACKENDS:
        raise ConfigError(f"{where}: backend: {proto.backend!r} is not onnxruntime")
    max_batch_size = proto.max_batch_size if proto.HasField("max_batch_size") else None
    if max_batch_size is not None and max_batch_size < 0:
        raise ConfigError(f"{where}: max_batch_size: {max_batch_size} is negative")
    return ModelSettings(
        name=model_name,
        source=where,
        max_batch_size=max_batch_size,
        inputs=tuple(_tensor(t, f"{where}: input[{i}]") for i, t in enumerate(proto.input)),
        outputs=tuple(_tensor(t, f"{where}: output[{i}]") for i, t in enumerate(proto.output)),
        batching=_batching(proto, where, max_batch_size or 0),
        session=_session(proto, where),
        version_policy=_version_policy(proto.version_policy, where),
        model_filename=proto.default_model_filename or "model.onnx",
    )


def _tensor(proto, where: str) -> TensorConfig:
    if not proto.name:
        raise ConfigError(f"{where}.name: missing")
    type_name = protocol.DataType.values_by_number[proto.data_type].name
    if type_name == "TYPE_INVALID":
        raise ConfigError(f"{where}.data_type: missing for tensor {proto.name!r}")
    for dim in proto.dims:
        if dim < -1 or dim == 0:
            raise ConfigError(f"{where}.dims: {list(proto.dims)} for tensor {proto.name!r}: dims are >= 1 or -1")
    if proto.HasField("reshape"):
        raise ConfigError(f"{where}.reshape: not supported by onnxserve (tensor {proto.name!r})")
    return TensorConfig(name=proto.name, datatype=WIRE_BY_CONFIG_TYPE[type_name], dims=tuple(proto.dims))


def _batching(proto, where: str, max_batch_size: int) -> BatchingSettings:
    dynamic = proto.dynamic_batching
    adaptive = {}
    for key, field_name in BATCHING_PARAMETERS.items():
        if key in proto.parameters:
            adaptive[field_name] = _parameter_value(key, proto.parameters[key].string_value, where)
    if not proto.HasField("dynamic_batching"):
        return BatchingSettings(max_batch_size=max_batch_size, **adaptive)
    if dynamic.priority_queue_policy:
        raise ConfigError(f"{where}: dynamic_batching.priority_queue_policy: not supported; use default_queue_policy")
    for size in dynamic.preferred_batch_size:
        if size < 1 or (max_batch_size and size > max_batch_size):
            raise ConfigError(
                f"{where}: dynamic_batching.preferred_batch_size: {size} is outside 1..max_batch_size ({max_batch_size})"
            )
    if dynamic.default_priority_level > dynamic.priority_levels:
        raise ConfigError(
            f"{where}: dynamic_batching.default_priority_level: {dynamic.default_priority_level} "
            f"exceeds priority_levels ({dynamic.priority_levels})"
        )
    policy = dynamic.default_queue_policy
    if policy.timeout_action != 0:
        raise ConfigError(f"{where}: dynamic_batching.default_queue_policy.timeout_action: only REJECT is supported")
    return BatchingSettings(
        max_batch_size=max_batch_size,
        max_queue_delay_us=dynamic.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(sorted(set(dynamic.preferred_batch_size))),
        priority_levels=dynamic.priority_levels,
        default_priority_level=dynamic.default_priority_level,
        queue_policy=QueuePolicy(
            max_queue_size=policy.max_queue_size,
            default_timeout_us=policy.default_timeout_microseconds,
            allow_timeout_override=policy.allow_timeout_override,
        ),
        **adaptive,
    )


def _session(proto, where: str) -> SessionSettings:
    groups = proto.instance_group
    if len(groups) > 1:
        raise ConfigError(f"{where}: instance_group: onnxserve supports one group, found {len(groups)}")
    values: dict = {}
    if groups:
        group = groups[0]
        kind = protocol.ModelInstanceGroup.DESCRIPTOR.enum_types_by_name["Kind"].values_by_number[group.kind].name
        if kind not in KIND_NAMES:
            raise ConfigError(f"{where}: instance_group[0].kind: {kind} is not KIND_AUTO, KIND_GPU or KIND_CPU")
        if group.count < 0:
            raise ConfigError(f"{where}: instance_group[0].count: {group.count} is negative")
        values.update(instance_kind=KIND_NAMES[kind], instance_count=group.count or 1, gpus=tuple(group.gpus))
    for key, parameter in proto.parameters.items():
        if key in BATCHING_PARAMETERS:
            continue
        if key not in SESSION_PARAMETERS:
            known = sorted([*SESSION_PARAMETERS, *BATCHING_PARAMETERS])
            raise ConfigError(f"{where}: parameters[{key!r}]: unknown; known: {known}")
        values[SESSION_PARAMETERS[key]] = _parameter_value(key, parameter.string_value, where)
    optimization = proto.optimization
    if optimization.HasField("graph"):
        level = {-1: 1, 0: 99, 1: 2, 2: 0}.get(optimization.graph.level)  # Triton's levels -> ORT's
        if level is None:
            raise ConfigError(f"{where}: optimization.graph.level: {optimization.graph.level} is not -1, 0, 1 or 2")
        values["graph_optimization_level"] = level
    accelerators = optimization.execution_accelerators
    if accelerators.cpu_execution_accelerator:
        raise ConfigError(f"{where}: optimization.execution_accelerators.cpu_execution_accelerator: not supported")
    gpu = []
    for i, accelerator in enumerate(accelerators.gpu_execution_accelerator):
        if accelerator.name not in GPU_ACCELERATORS:
            raise ConfigError(
                f"{where}: optimization.execution_accelerators.gpu_execution_accelerator[{i}].name: "
                f"{accelerator.name!r} is not one of {GPU_ACCELERATORS}"
            )
        gpu.append(Accelerator(accelerator.name, tuple(sorted(accelerator.parameters.items()))))
    values["gpu_accelerators"] = tuple(gpu)
    return SessionSettings(**values)


def _parameter_value(key: str, text: str, where: str) -> int | bool:
    if key == "allow_spinning":
        if text.strip().lower() not in BOOLEAN_PARAMETERS:
            raise ConfigError(f"{where}: parameters[{key!r}]: {text!r} is not 0, 1, true or false")
        return BOOLEAN_PARAMETERS[text.strip().lower()]
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"{where}: parameters[{key!r}]: {text!r} is not an integer") from None
    if count < 0:
        raise ConfigError(f"{where}: parameters[{key!r}]: {count} is negative")
    return count


def _version_policy(proto, where: str) -> VersionPolicy:
    choice = proto.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(kind="all")
    if choice == "specific":
        if not proto.specific.versions:
            raise ConfigError(f"{where}: version_policy.specific.versions: empty")
        return VersionPolicy(kind="specific", versions=tuple(proto.specific.versions))
    if choice == "latest":
        if proto.latest.num_versions < 1:
            raise ConfigError(f"{where}: version_policy.latest.num_versions: must be >= 1")
        return VersionPolicy(kind="latest", count=proto.latest.num_versions)
    return VersionPolicy()
