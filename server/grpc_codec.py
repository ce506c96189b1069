"""The gRPC transport's codec: a serialized ModelInferRequest in, a serialized ModelInferResponse
out, the request's bounds checked before its tensors are decoded.

The inference RPCs take and give bytes (grpc_service registers pass-through (de)serializers for
them), because protobuf's own would run on the event loop: upb parses ~1 GB/s on a small core and
copies raw contents again on every access, and building a response copies each output twice more.
So a big request is parsed where it is decoded, in a codec thread (limits.Offload), and a response
is its small header serialized by protobuf followed by its raw outputs written as wire fields, one
copy of each output."""

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from google.protobuf.message import DecodeError

from server import protocol
from server.errors import InvalidInput
from server.request_limits import MAX_REQUEST_RANK, OFFLOAD_BYTES, RequestLimits, encode_weight, shown
from server.tensors import TensorSpec, output_bytes

# Wire tags (field number << 3 | wire type; 2: length-delimited, 0: varint) the codec reads itself.
INPUT_TAG = 5 << 3 | 2  # ModelInferRequest.inputs = 5
OUTPUT_TAG = 6 << 3 | 2  # ModelInferRequest.outputs = 6
RAW_INPUT_TAG = 7 << 3 | 2  # ModelInferRequest.raw_input_contents = 7
SHAPE_PACKED_TAG, SHAPE_TAG = 3 << 3 | 2, 3 << 3 | 0  # InferInputTensor.shape = 3, packed or not
# Fields of one request (names, id, one per parameter, input, requested output and raw contents),
# or of one of its tensors: a model with thousands of inputs would still fit.
MAX_FIELDS = 1 << 16
RAW_OUTPUT_TAG = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents = 6, length-delimited
STREAM_RESPONSE_TAG = bytes([2 << 3 | 2])  # ModelStreamInferResponse.infer_response = 2
MAX_NAME_CHARACTERS = 1024  # of a model name or version: they are quoted back in errors


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What answering a request needs of its message once its tensors are decoded; the message,
    and its copy of the tensor bytes, can then go."""

    model_name: str
    model_version: str
    id: str
    parameters: dict[str, object]
    size: int  # of the serialized message: what decoding it may cost, in bytes


def parse_request(data: bytes) -> tuple[object, list[memoryview] | None]:
    """The ModelInferRequest, and its raw_input_contents as views of `data` (no copy); None for
    them when the message is small: then they are the message's own.

    upb would copy raw contents into its arena, then again into a new bytes object on each
    access: twice the request's size, for what np.frombuffer can take in place. So a big message's
    top-level fields are walked here (a few per request: inputs are skipped whole), the raw
    contents kept as views, and the rest given to protobuf. A small one (most) goes to protobuf
    whole: walking it in Python would cost more (~8 us) than the copies it saves."""
    try:
        if len(data) <= OFFLOAD_BYTES:
            return protocol.ModelInferRequest.FromString(data), None
        rest, raw = _split_raw(data)
        return protocol.ModelInferRequest.FromString(rest), raw
    except DecodeError:
        raise InvalidInput(f"the request ({len(data)} bytes) is not a valid ModelInferRequest message") from None


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]]:
    """(every top-level field but raw_input_contents, the raw_input_contents in order).

    On the way, what upb would spend memory on before any check could run: the number of fields,
    here and in each input and requested output (a flood of empty `outputs`, or of a tensor's
    `parameters`, costs upb ~40 bytes for each 2 on the wire), and each input's rank (a packed
    shape of 100M dims is 800 MB in the arena and 3.6 GB as a tuple of Python ints)."""
    view = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    kept = 0  # rest holds data[kept:field] once a raw field ends the run
    for count, (tag, field, start, end) in enumerate(_fields(data, 0, len(data))):
        if count == MAX_FIELDS:
            raise InvalidInput(f"the request has more than {MAX_FIELDS} fields (inputs, outputs, parameters...)")
        if tag in (INPUT_TAG, OUTPUT_TAG):
            _check_tensor(data, start, end)
        elif tag == RAW_INPUT_TAG:
            rest.append(view[kept:field])
            raw.append(view[start:end])
            kept = end
    if not raw:
        return data, raw
    rest.append(view[kept:])
    return b"".join(rest), raw


def _check_tensor(data: bytes, start: int, end: int) -> None:
    """Refuse an input or requested output (in data[start:end]) of more than MAX_FIELDS fields, or
    an input whose shape has more than MAX_REQUEST_RANK dims (outputs have no field 3)."""
    dims = packed = 0
    for count, (tag, _, value_start, value_end) in enumerate(_fields(data, start, end)):
        if count == MAX_FIELDS:
            raise InvalidInput(f"an input or output of the request has more than {MAX_FIELDS} fields (parameters...)")
        if tag == SHAPE_PACKED_TAG:
            packed += value_end - value_start
        elif tag == SHAPE_TAG:
            dims += 1
        if dims + -(-packed // 10) > MAX_REQUEST_RANK:  # a packed dim takes 1 to 10 bytes
            raise InvalidInput(f"an input's shape has more than {MAX_REQUEST_RANK} dims; models have at most {MAX_REQUEST_RANK}")


def _fields(data: bytes, start: int, end: int):
    """(tag, field start, value start, value end) of each protobuf field in data[start:end]."""
    offset = start
    while offset < end:
        tag, after = _read_varint(data, offset)
        wire = tag & 7
        if wire == 2:
            length, value_start = _read_varint(data, after)
            value_end = value_start + length
        elif wire == 0:
            value_start, value_end = after, _read_varint(data, after)[1]
        elif wire in (1, 5):
            value_start, value_end = after, after + (8 if wire == 1 else 4)
        else:
            raise DecodeError(f"wire type {wire} at byte {offset}")
        if value_end > end:
            raise DecodeError(f"a field at byte {offset} runs past its message")
        yield tag, offset, value_start, value_end
        offset = value_end


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """(value, offset after it) of the varint at `offset`."""
    value = shift = 0
    for index in range(offset, min(offset + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise DecodeError(f"a varint at byte {offset} does not end")


def request_head(request, size: int, limits: RequestLimits) -> RequestHead:
    """The request's name, version, id and parameters, each checked against its bound."""
    name, version = request.model_name, request.model_version
    if len(name) > MAX_NAME_CHARACTERS or len(version) > MAX_NAME_CHARACTERS:
        raise InvalidInput(
            f"model '{shown(name)}' version '{shown(version)}': names and versions are at most {MAX_NAME_CHARACTERS} characters"
        )
    label = f"model '{name}'"
    request_id = limits.check_id(request.id, label)
    parameters = request.parameters
    limits.check_parameters(len(parameters), label)
    said = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in parameters.items()}
    return RequestHead(name, version, request_id, said, size)


def response_weight(outputs: Iterable[tuple[TensorSpec, np.ndarray]]) -> int:
    return sum(encode_weight(array) for _, array in outputs)


def response_bytes(model, request_id: str, outputs, said, stream: bool = False) -> bytes:
    """A serialized ModelInferResponse (inside a ModelStreamInferResponse when `stream`).

    `outputs`: (TensorSpec, array) pairs; `said`: the accounting parameters."""
    response = protocol.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for spec, array in outputs:
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
    set_parameters(response.parameters, said)
    parts = [response.SerializeToString()]
    for spec, array in outputs:
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
