"""The gRPC transport's codec: a serialized ModelInferRequest in, a serialized ModelInferResponse
out, the request's bounds checked before its tensors are decoded.

The inference RPCs take and give bytes (grpc_service registers pass-through (de)serializers for
them), because protobuf's own would run on the event loop: upb parses ~1 GB/s on a small core and
copies raw contents again on every access, and building a response copies each output twice more.
So a big request's raw contents are found by walking its fields (on the loop when it has few, in a
codec thread otherwise), its other fields parsed by protobuf, and a response is its small header
serialized by protobuf followed by its raw outputs written as wire fields, one copy of each output."""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from server import protocol
from server.errors import InvalidInput, shown
from server.frontend.request_limits import (
    DEFAULT_LIMITS,
    ELEMENT_COST,
    OFFLOAD_BYTES,
    RequestLimits,
    encode_weight,
    raw_bytes_weight,
)
from server.frontend.shared_regions import REGION, REGION_OFFSET, REGION_SIZE, PlacedOutput
from server.frontend.tensor_codec import output_bytes
from server.frontend.wire_walk import LOOP_FIELDS, MAX_FIELDS, OverBudget, Walk, declared_elements
from server.models.names import NAME_MAX, check_model_name
from server.tensors import TensorSpec

RAW_OUTPUT_TAG = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents = 6, length-delimited
STREAM_RESPONSE_TAG = bytes([2 << 3 | 2])  # ModelStreamInferResponse.infer_response = 2


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What answering a request needs of its message once its tensors are decoded; the message,
    and its copy of the tensor bytes, can then go."""

    model_name: str
    model_version: str
    id: str
    parameters: dict[str, object]
    size: int  # of the serialized message, in bytes


def parse_request(
    data: bytes,
    max_bytes_elements: int = DEFAULT_LIMITS.max_bytes_elements,
    max_typed_elements: int = DEFAULT_LIMITS.max_typed_elements,
) -> tuple[object, list[memoryview] | None]:
    """The ModelInferRequest, and its raw_input_contents as views of `data` (no copy); None for
    them when the message is small: then they are the message's own. Blocking: a big message's
    walk may take milliseconds, so it runs in a codec thread (parse_on_loop says when not).

    upb would copy raw contents into its arena, then again into a new bytes object on each
    access: twice the request's size, for what np.frombuffer can take in place. So a big message's
    fields are walked here, the raw contents kept as views, and the rest given to protobuf. A
    small one (most) goes to protobuf whole: walking it in Python would cost more (~8 us) than the
    copies it saves, and what it can make protobuf spend is bounded by its size."""
    try:
        if len(data) <= OFFLOAD_BYTES:
            return protocol.ModelInferRequest.FromString(data), None
        walk = Walk(data, MAX_FIELDS)
        rest, raw = walk.split(check_tensors=True)
        walk.check_bytes_contents(max_bytes_elements)
        walk.check_typed_contents(max_typed_elements)
        return protocol.ModelInferRequest.FromString(b"".join(rest)), raw
    except OverBudget:
        raise InvalidInput(f"the request has more than {MAX_FIELDS} fields (inputs, outputs, parameters...)") from None
    except DecodeError:
        raise InvalidInput(f"the request ({len(data)} bytes) is not a valid ModelInferRequest message") from None


def parse_on_loop(data: bytes) -> tuple[object, list[memoryview] | None] | None:
    """parse_request's answer where it is cheap enough for the event loop, else None: a small
    message, or a big one of few top-level fields whose bytes besides its raw contents would make
    a small message (a big numeric request). Protobuf parses that rest as it parses a small
    message, with the same bound on what it may spend, so the rest's tensors need no walk."""
    if len(data) <= OFFLOAD_BYTES:
        return parse_request(data)
    try:
        rest, raw = Walk(data, LOOP_FIELDS).split(check_tensors=False)
        if sum(len(part) for part in rest) > OFFLOAD_BYTES:
            return None
        return protocol.ModelInferRequest.FromString(b"".join(rest)), raw
    except OverBudget:
        return None
    except DecodeError:
        raise InvalidInput(f"the request ({len(data)} bytes) is not a valid ModelInferRequest message") from None


def decode_weight(message, raw: list[memoryview] | None, size: int) -> int:
    """What decode_request weighs (request_limits.Offload): BYTES and typed contents element by
    element; raw numbers nothing, as they are views of the wire bytes however big. A small
    message's raw contents are protobuf's own, not read here: its size stands for them, as it does
    for a message of more inputs than the loop should look at one by one."""
    if raw is None or len(message.inputs) > LOOP_FIELDS:
        return size
    weight = 0
    for index, tensor in enumerate(message.inputs):
        if tensor.HasField("contents"):
            weight += ELEMENT_COST * sum(len(values) for _, values in tensor.contents.ListFields())
        if tensor.datatype == "BYTES" and index < len(raw):
            weight += raw_bytes_weight(len(raw[index]), declared_elements(tensor.shape))
    return weight


def request_head(request, size: int, limits: RequestLimits) -> RequestHead:
    """The request's name, version, id and parameters, each checked against its bound: what an
    error on a stream echoes, so a name no model can have is refused before anything quotes it."""
    name, version = request.model_name, request.model_version
    if len(name) > NAME_MAX:  # characters: at least as many bytes, so past the repository's bound
        check_model_name(name)  # raises, saying why
    if len(version) > NAME_MAX:
        raise InvalidInput(
            f"model '{shown(name)}': the model version is {len(version)} characters long; at most {NAME_MAX}"
        )
    label = f"model '{name}'"
    request_id = limits.check_id(request.id, label)
    parameters = request.parameters
    limits.check_parameters(len(parameters), label)
    said = {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in parameters.items()
    }
    return RequestHead(name, version, request_id, said, size)


def response_weight(outputs: Iterable[tuple[TensorSpec, np.ndarray]]) -> int:
    return sum(encode_weight(array) for _, array in outputs if not isinstance(array, PlacedOutput))


def response_bytes(model, request_id: str, outputs, said, stream: bool = False) -> bytes:
    """A serialized ModelInferResponse (inside a ModelStreamInferResponse when `stream`).

    `outputs`: (TensorSpec, array) pairs; `said`: the accounting parameters."""
    response = protocol.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for spec, array in outputs:
        added = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if isinstance(array, PlacedOutput):  # in the caller's shared memory: named, no bytes
            set_parameters(
                added.parameters, [(REGION, array.region), (REGION_OFFSET, array.offset), (REGION_SIZE, array.size)]
            )
    set_parameters(response.parameters, said)
    parts = [response.SerializeToString()]
    for spec, array in outputs:
        if isinstance(array, PlacedOutput):  # placed last: raw contents stand for the outputs before them
            break
        raw = output_bytes(spec.datatype, array)
        parts += (RAW_OUTPUT_TAG, _varint(len(raw)), raw)  # a repeated field may follow the rest
    if stream:
        size = sum(len(part) for part in parts)
        parts[:0] = (STREAM_RESPONSE_TAG, _varint(size))
    return b"".join(parts)


def set_parameters(parameters, said: Iterable[tuple[str, object]]) -> None:
    for key, value in said:
        if isinstance(value, str):
            parameters[key].string_param = value
        elif isinstance(value, float):
            parameters[key].double_param = value
        else:
            parameters[key].int64_param = value


def serialize_response(message) -> bytes:
    """The inference RPCs' response serializer: their answers are bytes already, errors messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
