"""onnxserve-tune's configurations as the server reads them: a Candidate applied to the model's
own ModelConfig, checked by the server's own parser, and the winner written as config.pbtxt
beside the model (after a backup of the old one; never silently over it)."""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from server import protocol
from server.errors import ConfigError
from server.models.model_config import load_model_settings, settings_from_json
from server.tune.search import Candidate

CONFIG_FILE = "config.pbtxt"
KIND_BY_NAME = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
THREADS = "intra_op_thread_count"


def own_config(model_dir: Path):
    """The model's config.pbtxt as a ModelConfig message, or an empty one (all derived at load)."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return protocol.ModelConfig()
    try:
        return text_format.Parse(path.read_text(), protocol.ModelConfig())
    except (text_format.ParseError, OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None


def own_candidate(proto, served_max_batch_size: int, gpu: bool) -> Candidate:
    """The model's own configuration as a Candidate; `served_max_batch_size` is what the server
    completed from the graph (0: the model does not batch)."""
    group = proto.instance_group[0] if proto.instance_group else None
    kinds = protocol.ModelInstanceGroup.DESCRIPTOR.enum_types_by_name["Kind"]
    kind_name = kinds.values_by_number[group.kind].name if group else "KIND_AUTO"
    kind = {"KIND_GPU": "gpu", "KIND_CPU": "cpu"}.get(kind_name, "gpu" if gpu else "cpu")
    accelerators = proto.optimization.execution_accelerators.gpu_execution_accelerator
    trt_fp16 = any(
        a.name == "tensorrt" and a.parameters.get("precision_mode", "").upper() == "FP16" for a in accelerators
    )
    threads = proto.parameters[THREADS].string_value if THREADS in proto.parameters else "0"
    return Candidate(
        kind=kind,
        max_batch_size=served_max_batch_size,
        queue_delay_us=proto.dynamic_batching.max_queue_delay_microseconds,
        instances=(group.count or 1) if group else 1,
        threads=int(threads) if threads.isdigit() else 0,
        graph_level=proto.optimization.graph.level,
        accelerator="tensorrt_fp16" if trt_fp16 else "",
    )


def changed_fields(candidate: Candidate, own: Candidate) -> list[str]:
    return [name for name in Candidate.__dataclass_fields__ if getattr(candidate, name) != getattr(own, name)]


def to_proto(own_proto, own: Candidate, candidate: Candidate):
    """The model's own ModelConfig with only the settings where `candidate` differs from `own`
    changed: the model's own candidate is its config exactly."""
    proto = protocol.ModelConfig()
    proto.CopyFrom(own_proto)
    changed = set(changed_fields(candidate, own))
    if "max_batch_size" in changed:
        proto.max_batch_size = candidate.max_batch_size
    if "queue_delay_us" in changed:
        proto.dynamic_batching.max_queue_delay_microseconds = candidate.queue_delay_us
    if changed & {"instances", "kind"}:
        group = proto.instance_group[0] if proto.instance_group else proto.instance_group.add()
        group.count = candidate.instances
        group.kind = (
            protocol.ModelInstanceGroup.DESCRIPTOR.enum_types_by_name["Kind"]
            .values_by_name[KIND_BY_NAME[candidate.kind]]
            .number
        )
    if "threads" in changed:
        if candidate.threads:
            proto.parameters[THREADS].string_value = str(candidate.threads)
        else:
            del proto.parameters[THREADS]  # chosen by measurement at load
    if "graph_level" in changed:
        proto.optimization.graph.level = candidate.graph_level
    if "accelerator" in changed:
        accelerators = proto.optimization.execution_accelerators.gpu_execution_accelerator
        del accelerators[:]
        if candidate.accelerator == "tensorrt_fp16":
            accelerators.add(name="tensorrt").parameters["precision_mode"] = "FP16"
    return proto


def as_json(proto) -> str:
    """What a load request's `config` parameter carries."""
    return json_format.MessageToJson(proto, indent=None, preserving_proto_field_name=True)


def check(proto, model: str) -> str:
    """'' when the server's own parser accepts the configuration, else its message."""
    try:
        settings_from_json(as_json(proto), model)
    except ConfigError as err:
        return str(err)
    return ""


@dataclass(frozen=True)
class Written:
    path: Path
    backup: Path | None  # where the old config.pbtxt went; None when there was none


def next_backup(path: Path) -> Path:
    """config.pbtxt.bak, or the first free config.pbtxt.bak.N: an older backup is never replaced."""
    candidate = path.with_name(path.name + ".bak")
    number = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{number}")
        number += 1
    return candidate


def write_config(model_dir: Path, proto, header: list[str]) -> Written:
    """Write config.pbtxt (a comment header, then protobuf text format), keeping the old file as a
    backup; the file appears whole (a rename), so a polling server never reads half of it. Then
    read back with the server's own loader: a file that does not round-trip is an error."""
    path = model_dir / CONFIG_FILE
    backup = next_backup(path) if path.exists() else None
    if backup is not None:
        shutil.copy2(path, backup)
    text = "".join(f"# {line}\n" for line in header) + text_format.MessageToString(proto)
    handle, temporary = tempfile.mkstemp(prefix=".config.pbtxt.", dir=model_dir)  # a dot: poll mode ignores it
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.chmod(
        temporary, (backup.stat().st_mode & 0o777) if backup is not None else 0o644
    )  # mkstemp's 0600 would hide it
    os.replace(temporary, path)
    load_model_settings(model_dir)  # raises ConfigError naming the file and field
    if text_format.Parse(path.read_text(), protocol.ModelConfig()) != proto:
        raise ConfigError(f"{path}: what was written does not read back as the configuration measured")
    return Written(path, backup)
