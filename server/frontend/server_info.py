"""What the server says about itself, for both transports: its name, version and extensions, the
platform of its models, and Triton's JSON mapping of a protobuf message (REST's model config and
statistics). Light on purpose: a front end's process imports it without the engine's machinery."""

from functools import cache
from importlib import metadata

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "onnxserve"
EXTENSIONS = (
    "model_configuration",
    "model_repository",
    "schedule_policy",
    "parameters",
    "binary_tensor_data",
    "statistics",
)
SHARED_MEMORY_EXTENSION = "system_shared_memory"  # said where regions are served


def extensions(serves_regions: bool) -> tuple[str, ...]:
    return (*EXTENSIONS, SHARED_MEMORY_EXTENSION) if serves_regions else EXTENSIONS


@cache
def server_version() -> str:
    try:
        return metadata.version("onnxserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def proto_json(message) -> dict:
    """A message as Triton's REST API writes it: proto field names, every scalar field (defaults
    included, as clients index them), 64-bit integers as JSON numbers, enums by name."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None and not field.is_repeated and not message.HasField(field.name):
            continue
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name) != field.name:
            continue
        out[field.name] = _json_value(field, getattr(message, field.name))
    return out


def _json_value(field, value):
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        inner = field.message_type.fields_by_name["value"]
        return {key: _json_scalar(inner, item) for key, item in value.items()}
    if field.is_repeated:
        return [_json_scalar(field, item) for item in value]
    return _json_scalar(field, value)


def _json_scalar(field, value):
    if field.message_type is not None:
        return proto_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value
