"""A model's configuration: config.pbtxt, or a JSON ModelConfig given with a load request.

Triton's ModelConfig message, parsed and validated into frozen dataclasses. Errors name
the file (or the request parameter) and the field that is wrong.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from server import protocol
from server.engine import providers
from server.errors import ConfigError
from server.models import model_limits, sequence_config


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
    io_binding: bool | None = None
    """Run through onnxruntime's IO binding (inputs copied to the device once per batch, outputs
    allocated there and copied back once); None = on GPU instances only, as measured: on the CPU
    it costs about 3 us more per batch than session.run. Models with BYTES tensors cannot bind."""
    inline_run_below_us: int | None = None
    """Batches whose measured run time stays below this run on the event loop, not the instance's
    thread (whose handoff costs tens of us of CPU); 0 = always the thread; None = chosen at load:
    on the loop when the model ran faster than a measured handoff. A slow batch run inline stalls
    every other request, so a measured run above the limit sends the model back to its thread."""
    allow_spinning: bool | None = None
    """Whether onnxruntime's intra-op threads spin between runs; None = chosen at load."""
    gpu_accelerators: tuple[Accelerator, ...] = ()
    model_cuda_options: tuple[tuple[str, str], ...] = ()
    """CUDA provider options given as model-level `parameters` (Triton's older form); the cuda
    accelerator's own parameters win over them."""


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
class WarmupInput:
    """One input of a warm-up sample (Triton's ModelWarmup.Input)."""

    name: str
    datatype: str  # wire datatype
    dims: tuple[int, ...]  # without the batch dimension
    data: str  # "zero", "random" or "file"
    data_file: str = ""  # with "file": relative to <model>/warmup/


@dataclass(frozen=True)
class WarmupSample:
    """config.pbtxt `model_warmup`: a request every instance runs before the model is ready."""

    name: str
    batch_size: int  # rows; 0 for a model that does not batch
    inputs: tuple[WarmupInput, ...]
    count: int  # runs per instance, at least 1
    where: str  # the file and field, for errors


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
    warmup: tuple[WarmupSample, ...] = ()
    """Explicit warm-up; empty = one best-effort run with zeros per instance."""
    sequence: "sequence_config.SequenceSettings | None" = None  # quoted: the two modules import each other
    """config.pbtxt `sequence_batching`; None = requests are independent."""


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
    "io_binding": "io_binding",
}
BATCHING_PARAMETERS = {"adaptive_queue_delay_us": "adaptive_delay_us"}
BOOLEAN_PARAMETERS = {"0": False, "1": True, "false": False, "true": True}
GPU_ACCELERATORS = ("tensorrt", "cuda")
ONNX_PLATFORMS = ("", "onnxruntime_onnx")
ONNX_BACKENDS = ("", "onnxruntime")


def load_model_settings(model_dir: Path) -> ModelSettings:
    """Read <model_dir>/config.pbtxt if there is one; ConfigError names file and field. Blocking."""
    path = model_dir / "config.pbtxt"
    if not path.exists():
        return ModelSettings(name=model_dir.name, source="(no config.pbtxt)")
    try:
        with open(path, "rb") as handle:
            content = handle.read(model_limits.MAX_CONFIG_BYTES + 1)
            size = max(len(content), os.fstat(handle.fileno()).st_size)
        model_limits.check_size(size, "bytes", str(path))
        proto = text_format.Parse(content.decode(), protocol.ModelConfig())
    except text_format.ParseError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    return settings_from_proto(proto, str(path), model_dir.name)


def settings_from_json(text: str, model_name: str) -> ModelSettings:
    """A load request's `config` parameter: Triton's JSON mapping of ModelConfig, which
    replaces config.pbtxt for that load."""
    where = "load request parameter 'config'"
    model_limits.check_size(len(text), "characters", where)
    try:
        proto = json_format.Parse(text, protocol.ModelConfig())
    except json_format.ParseError as err:
        raise ConfigError(f"{where}: not a JSON ModelConfig: {err}") from None
    return settings_from_proto(proto, where, model_name)


def settings_from_proto(proto, where: str, model_name: str) -> ModelSettings:
    if proto.name and proto.name != model_name:
        raise ConfigError(f"{where}: name: {proto.name!r} differs from the directory name {model_name!r}")
    if proto.platform not in ONNX_PLATFORMS:
        raise ConfigError(f"{where}: platform: {proto.platform!r} is not onnxruntime_onnx")
    if proto.backend not in ONNX_BACKENDS:
        raise ConfigError(f"{where}: backend: {proto.backend!r} is not onnxruntime")
    max_batch_size = proto.max_batch_size if proto.HasField("max_batch_size") else None
    if max_batch_size is not None and max_batch_size < 0:
        raise ConfigError(f"{where}: max_batch_size: {max_batch_size} is negative")
    model_limits.check(proto, where)  # before anything is sized by these numbers
    return ModelSettings(
        name=model_name,
        source=where,
        max_batch_size=max_batch_size,
        inputs=tuple(_tensor(t, f"{where}: input[{i}]") for i, t in enumerate(proto.input)),
        outputs=tuple(_tensor(t, f"{where}: output[{i}]") for i, t in enumerate(proto.output)),
        batching=_batching(proto, where, max_batch_size or 0),
        session=_session(proto, where),
        version_policy=_version_policy(proto.version_policy, where),
        model_filename=_model_filename(proto.default_model_filename, where),
        warmup=tuple(_warmup(sample, f"{where}: model_warmup[{i}]") for i, sample in enumerate(proto.model_warmup)),
        sequence=sequence_config.sequence_settings(proto, where, max_batch_size),
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
    model_cuda = {}  # Triton's older, model-level spelling of four CUDA provider options
    for key, parameter in proto.parameters.items():
        if key in BATCHING_PARAMETERS:
            continue
        if key in providers.CUDA_MODEL_PARAMETERS:
            model_cuda[key] = parameter.string_value
            continue
        if key not in SESSION_PARAMETERS:
            known = sorted([*SESSION_PARAMETERS, *BATCHING_PARAMETERS, *providers.CUDA_MODEL_PARAMETERS])
            raise ConfigError(f"{where}: parameters[{key!r}]: unknown; known: {known}")
        values[SESSION_PARAMETERS[key]] = _parameter_value(key, parameter.string_value, where)
    providers.check_options("cuda", model_cuda, f"{where}: model")
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
        field_name = f"{where}: optimization.execution_accelerators.gpu_execution_accelerator[{i}]"
        if accelerator.name not in GPU_ACCELERATORS:
            raise ConfigError(f"{field_name}.name: {accelerator.name!r} is not one of {GPU_ACCELERATORS}")
        parameters = dict(accelerator.parameters)
        providers.check_options(accelerator.name, parameters, field_name)
        gpu.append(Accelerator(accelerator.name, tuple(sorted(parameters.items()))))
    providers.check_combination(
        [(a.name, dict(a.parameters)) for a in gpu], f"{where}: optimization.execution_accelerators"
    )
    values["gpu_accelerators"] = tuple(gpu)
    values["model_cuda_options"] = tuple(sorted(model_cuda.items()))  # options, not a request for a GPU
    session = SessionSettings(**values)
    model_limits.check_threads(session.instance_count, session.intra_op_threads, where)
    return session


def _parameter_value(key: str, text: str, where: str) -> int | bool:
    if key in ("allow_spinning", "io_binding"):
        if text.strip().lower() not in BOOLEAN_PARAMETERS:
            raise ConfigError(f"{where}: parameters[{key!r}]: {text!r} is not 0, 1, true or false")
        return BOOLEAN_PARAMETERS[text.strip().lower()]
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"{where}: parameters[{key!r}]: {text!r} is not an integer") from None
    if count < 0:
        raise ConfigError(f"{where}: parameters[{key!r}]: {count} is negative")
    return model_limits.at_most(count, model_limits.PARAMETER_BOUNDS[key], where, f"parameters[{key!r}]")


def _warmup(proto, where: str) -> WarmupSample:
    if not proto.name:
        raise ConfigError(f"{where}.name: missing")
    if not proto.inputs:
        raise ConfigError(f"{where}.inputs: empty for warm-up sample {proto.name!r}")
    inputs = []
    for name, given in sorted(proto.inputs.items()):
        field_name = f"{where}.inputs[{name!r}]"
        type_name = protocol.DataType.values_by_number[given.data_type].name
        if type_name == "TYPE_INVALID":
            raise ConfigError(f"{field_name}.data_type: missing")
        if any(dim < 1 for dim in given.dims):
            raise ConfigError(f"{field_name}.dims: {list(given.dims)}: a warm-up sample has fixed dims >= 1")
        choice = given.WhichOneof("input_data_type")
        if choice is None:
            raise ConfigError(f"{field_name}: set one of zero_data, random_data or input_data_file")
        data_file = given.input_data_file if choice == "input_data_file" else ""
        if choice == "input_data_file" and not _inside(data_file):
            raise ConfigError(f"{field_name}.input_data_file: {data_file!r} must be a path inside <model>/warmup/")
        data = {"zero_data": "zero", "random_data": "random", "input_data_file": "file"}[choice]
        inputs.append(WarmupInput(name, WIRE_BY_CONFIG_TYPE[type_name], tuple(given.dims), data, data_file))
    return WarmupSample(proto.name, proto.batch_size, tuple(inputs), max(1, proto.count), where)


def _inside(relative: str) -> bool:
    parts = Path(relative).parts
    return bool(parts) and "\0" not in relative and not Path(relative).is_absolute() and ".." not in parts


def _model_filename(name: str, where: str) -> str:
    """A file name inside the version directory, nothing more."""
    if not name:
        return "model.onnx"
    if "/" in name or "\0" in name or name in (".", ".."):
        raise ConfigError(f"{where}: default_model_filename: {name!r} must be a file name inside the version directory")
    return name


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
