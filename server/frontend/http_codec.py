"""KServe v2 REST bodies to numpy and back: the JSON infer request with tensors as JSON lists
or in Triton's binary tensor data extension (`Inference-Header-Content-Length`,
`binary_data_size`), and the response in whichever form each output was asked for.

Binary tensors are the fast path: np.frombuffer on the request body, one tobytes per output."""

from dataclasses import dataclass, field

import numpy as np
import orjson

from server.errors import InvalidInput, shown
from server.frontend.request_limits import (
    DEFAULT_LIMITS,
    MAX_REQUEST_RANK,
    ElementBudget,
    RequestLimits,
    bytes_budget,
    declared_count,
    shape_text,
)
from server.frontend.shared_regions import REGION, REGION_OFFSET, REGION_SIZE, PlacedOutput
from server.frontend.shared_regions import TenantRegions as Regions
from server.frontend.tensor_codec import batch_rows, check_shape, checked_datatype, from_raw, output_bytes
from server.tensors import DecodedRequest, Signature, TensorSpec

HEADER_LENGTH = "inference-header-content-length"
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# Values converted (or serialized) per numpy (or orjson) call: such a call holds the GIL throughout,
# and 64K values take ~2 ms, so a codec thread working on a big tensor lets the loop in between.
CHUNK = 1 << 16


@dataclass(slots=True)
class HttpInfer:
    """An infer request's JSON header and the binary tensor data that follows it."""

    header: dict
    binary: memoryview
    id: str | None = None  # checked by decode_infer: a bounded string, or absent
    parameters: dict = field(default_factory=dict)  # the request's, checked by decode_infer


@dataclass(slots=True)
class Encoded:
    body: bytes
    header_length: int | None  # set when binary outputs follow the JSON


def split_body(body: bytes, header_length: str | None, max_values: int | None = None, label: str = "") -> HttpInfer:
    """The JSON header (all of the body without the header) and the binary part after it.

    orjson makes a Python object of every JSON value, 30-60 bytes however short the value, so a
    body of tiny values costs 10-20x its size: past `max_values` commas (each value but the last
    in a list or object follows one) the JSON is refused before it is parsed."""
    size = len(body)
    if header_length is None:
        length = size
    else:
        if not (header_length.isascii() and header_length.isdigit()):
            raise InvalidInput(f"Inference-Header-Content-Length: {header_length!r} is not a number of bytes")
        length = int(header_length)
        if not 0 <= length <= size:
            raise InvalidInput(f"Inference-Header-Content-Length: {length} bytes, but the body has {size}")
    if max_values is not None and (commas := body.count(b",", 0, length)) > max_values:
        raise InvalidInput(
            f"{label + ': ' if label else ''}the request's JSON has {commas} commas, so up to as many values; at most "
            f"{max_values} (--max-json-values): send big tensors as binary data (binary_data_size)"
        )
    try:
        header = orjson.loads(memoryview(body)[:length])
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"the request's JSON is malformed: {err}") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"the request's JSON must be an object; got {type(header).__name__}")
    return HttpInfer(header, memoryview(body)[length:])


def decode_infer(
    request: HttpInfer, signature: Signature, limits: RequestLimits = DEFAULT_LIMITS, regions: Regions | None = None
) -> tuple[DecodedRequest, dict[str, bool]]:
    """Feeds checked against the signature, and for each output asked for whether it goes back
    binary; the request's id and parameters checked first, into `request`. `regions`: the caller's
    shared memory (its tenant's), where inputs that name a region are read from."""
    given = request.header.get("id")
    request.id = None if given is None else limits.check_id(given, signature.label)
    parameters = request.header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{signature.label}: 'parameters' must be an object; got {type(parameters).__name__}")
    limits.check_parameters(len(parameters), signature.label)
    request.parameters = parameters
    inputs = request.header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"{signature.label}: the request has no 'inputs' list")
    feeds: dict[str, np.ndarray] = {}
    offset, budget = 0, bytes_budget(limits)
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{signature.label}: inputs[{index}] is not an object")
        name, array, used = _input(tensor, index, request.binary, offset, signature, budget, regions)
        if name in feeds:
            raise InvalidInput(f"{signature.label}: input '{name}' appears twice")
        feeds[name] = array
        offset += used
    if offset != len(request.binary):
        raise InvalidInput(
            f"{signature.label}: {len(request.binary) - offset} bytes of binary data follow the JSON, but no input's "
            "binary_data_size accounts for them"
        )
    if len(feeds) != len(signature.inputs):
        missing = [spec.name for spec in signature.inputs if spec.name not in feeds]
        raise InvalidInput(
            f"{signature.label}: missing inputs {missing}; the model needs {Signature._names(signature.inputs)}"
        )
    binary = _outputs(request.header, signature)
    return DecodedRequest(feeds=feeds, rows=batch_rows(feeds, signature), outputs=tuple(binary)), binary


def _input(
    tensor: dict,
    index: int,
    binary: memoryview,
    offset: int,
    signature: Signature,
    budget: ElementBudget,
    regions: Regions | None = None,
) -> tuple[str, np.ndarray, int]:
    """(name, array, binary bytes used) of one input."""
    name, shape, wire = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str):
        raise InvalidInput(f"{signature.label}: inputs[{index}] has no 'name' string")
    spec = signature.input_specs.get(name) or signature.input(name)  # input() raises, naming the model's inputs
    where = f"{signature.label}: input '{name}'"
    if not isinstance(shape, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers; got {shown(shape)}")
    if len(shape) > MAX_REQUEST_RANK:
        raise InvalidInput(f"{where}: shape {shape_text(shape)} has {len(shape)} dims; expected {list(spec.shape)}")
    shape = tuple(shape)
    datatype = checked_datatype(wire if isinstance(wire, str) else repr(wire), spec, where)
    check_shape(shape, spec, signature, where)
    count = declared_count(shape, where)
    if datatype.numpy is None:
        budget.spend(count, where)
    parameters = tensor.get("parameters") or {}
    if isinstance(parameters, dict) and REGION in parameters:
        return name, from_raw(_region_bytes(parameters, regions, datatype, shape, where), datatype, shape, where), 0
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        if "data" not in tensor:
            raise InvalidInput(f"{where}: has neither 'data' nor a binary_data_size parameter")
        # Dropped from the header once converted: a JSON list costs ~32 bytes a value, 8x its tensor.
        return name, from_json(tensor.pop("data"), datatype, shape, where), 0
    if "data" in tensor:
        raise InvalidInput(f"{where}: has both 'data' and binary_data_size; send one")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer; got {shown(size)}")
    if offset + size > len(binary):
        raise InvalidInput(
            f"{where}: binary_data_size {size} runs past the body ({len(binary) - offset} binary bytes left)"
        )
    chunk = binary[offset : offset + size]
    return name, from_raw(chunk, datatype, shape, where), size


def _region_bytes(parameters: dict, regions: Regions | None, datatype, shape, where: str) -> memoryview:
    """An input's bytes in the caller's shared memory, as its parameters name them."""
    if regions is None:
        raise InvalidInput(f"{where}: names a shared memory region; this server serves none (--frontends > 1)")
    name, size, offset = parameters.get(REGION), parameters.get(REGION_SIZE), parameters.get(REGION_OFFSET, 0)
    if not isinstance(name, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, offset)):
        raise InvalidInput(f"{where}: {REGION} must be a string, {REGION_SIZE} and {REGION_OFFSET} integers")
    expected = declared_count(shape, where) * datatype.numpy.itemsize if datatype.numpy is not None else size
    if size != expected:
        raise InvalidInput(
            f"{where} in shared memory region '{shown(name)}' at offset {offset}: shared_memory_byte_size {size}; "
            f"shape {shape_text(shape)} of {datatype.wire} needs {expected}"
        )
    return regions.view(name, offset, size, where)


def from_json(data, datatype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor from its JSON `data`: flat or nested lists, row-major; BYTES as strings. Values
    are checked one by one, as a JSON list already costs that: no silent truncation or wrap.

    Converted CHUNK values at a time: numpy's conversion of a list is one C call that holds the
    GIL throughout (~80 ms for 4M values), which would stall the event loop even from a thread."""
    count = declared_count(shape, where)
    flat = _flat(data, shape, where)
    if len(flat) != count:
        raise InvalidInput(f"{where}: data holds {len(flat)} values; shape {shape_text(shape)} needs {count}")
    array = np.empty(count, dtype=object if datatype.numpy is None else datatype.numpy)
    for start in range(0, count, CHUNK):
        array[start : start + CHUNK] = _chunk(flat[start : start + CHUNK], datatype, where)
    return array.reshape(shape)


def _chunk(values: list, datatype, where: str):
    """Some of a tensor's JSON values, checked, as what numpy can take into the tensor."""
    target = datatype.numpy
    if target is None:
        if not all(type(item) is str for item in values):
            raise InvalidInput(f"{where}: BYTES data must be strings")
        return values
    if target.kind == "b":
        if not all(type(item) is bool for item in values):
            raise InvalidInput(f"{where}: BOOL data must be true or false")
    elif target.kind in "iu":
        if not all(type(item) is int for item in values):
            raise InvalidInput(f"{where}: {datatype.wire} data must be integers")
        info, low, high = np.iinfo(target), min(values), max(values)
        if low < info.min or high > info.max:
            raise InvalidInput(
                f"{where}: data holds {low if low < info.min else high}, outside {datatype.wire}'s {info.min}..{info.max}"
            )
    else:  # FP16, FP32, FP64
        if not all(type(item) in (int, float) for item in values):
            raise InvalidInput(f"{where}: {datatype.wire} data must be numbers")
        return _floats(values, datatype, where)
    return np.array(values, dtype=target)


def _floats(flat: list, datatype, where: str) -> np.ndarray:
    """JSON numbers as FP16/32/64. JSON has no infinity, so one in the array is a value beyond the
    type's range (70000 as FP16): refused like an integer that would wrap, not sent on as inf."""
    with np.errstate(over="ignore"):
        array = np.array(flat, dtype=datatype.numpy)
    finite = np.isfinite(array)
    if not finite.all():
        value = flat[int(np.argmin(finite))]
        limit = float(np.finfo(datatype.numpy).max)
        raise InvalidInput(f"{where}: data holds {value}, outside {datatype.wire}'s range of ±{limit:g}")
    return array


def _flat(data, shape: tuple[int, ...], where: str) -> list:
    """`data` as one row-major list: flat, or nested exactly as deep and as long as the shape."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: 'data' must be a list")
    if not any(isinstance(item, list) for item in data):
        return data
    level = [data]
    for dim in shape:
        below = []
        for node in level:
            if not isinstance(node, list) or len(node) != dim:
                raise InvalidInput(f"{where}: the nesting of 'data' does not follow shape {shape_text(shape)}")
            below.extend(node)
        level = below
    if any(isinstance(item, list) for item in level):
        raise InvalidInput(f"{where}: 'data' is nested deeper than shape {shape_text(shape)}")
    return level


def _outputs(header: dict, signature: Signature) -> dict[str, bool]:
    """Output name -> binary, in the order asked; every output when none are named."""
    parameters = header.get("parameters") or {}
    everything_binary = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    requested = header.get("outputs")
    if not requested:
        return {name: everything_binary for name in signature.output_names}
    if not isinstance(requested, list):
        raise InvalidInput(f"{signature.label}: 'outputs' must be a list")
    chosen = {}
    for index, output in enumerate(requested):
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise InvalidInput(f"{signature.label}: outputs[{index}] has no 'name' string")
        if name not in signature.output_names:
            signature.output(name)  # raises, naming the model's outputs
        own = output.get("parameters") or {}
        chosen[name] = bool(own.get("binary_data", everything_binary)) if isinstance(own, dict) else everything_binary
    return chosen


def output_regions(header: dict, regions: Regions | None, label: str) -> dict[str, tuple]:
    """Output name -> (region, offset, size), for the outputs asked for in shared memory."""
    placed = {}
    for output in header.get("outputs") or ():
        own = output.get("parameters") if isinstance(output, dict) else None
        if not isinstance(own, dict) or REGION not in own:
            continue
        what = f"{label}: output '{shown(output.get('name'))}'"
        if regions is None:
            raise InvalidInput(f"{what}: names a shared memory region; this server serves none (--frontends > 1)")
        size, offset = own.get(REGION_SIZE), own.get(REGION_OFFSET, 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, offset)):
            raise InvalidInput(f"{what}: {REGION_SIZE} and {REGION_OFFSET} must be integers")
        placed[output["name"]] = (regions.get(str(own[REGION])), offset, size)
    return placed


def encode_infer(
    model: str, version: str, request_id, outputs: list[tuple[TensorSpec, np.ndarray, bool]], parameters: dict
) -> Encoded:
    """The response: JSON, then the binary outputs in order."""
    described, tails = [], []
    for spec, array, binary in outputs:
        entry = {"name": spec.name, "datatype": spec.datatype, "shape": array.shape}
        if isinstance(array, PlacedOutput):  # in the caller's shared memory: named, no data
            entry["parameters"] = {REGION: array.region, REGION_OFFSET: array.offset, REGION_SIZE: array.size}
        elif binary:
            raw = output_bytes(spec.datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        elif spec.datatype == "BYTES":
            texts = [
                item if isinstance(item, str) else bytes(item).decode("utf-8", "replace") for item in array.reshape(-1)
            ]
            entry["data"] = _json_list(texts)
        else:
            entry["data"] = _json_list(np.ascontiguousarray(array).reshape(-1))
        described.append(entry)
    response = {"model_name": model, "model_version": version, "parameters": parameters, "outputs": described}
    if request_id is not None:
        response["id"] = request_id
    header = orjson.dumps(response, option=JSON_OPTIONS)
    if not tails:
        return Encoded(header, None)
    return Encoded(header + b"".join(tails), len(header))


def _json_list(values):
    """`values` for orjson to write as a JSON list: a long one already written, CHUNK at a time."""
    if len(values) <= CHUNK:
        return values
    parts = [
        orjson.dumps(values[start : start + CHUNK], option=JSON_OPTIONS)[1:-1] for start in range(0, len(values), CHUNK)
    ]
    return orjson.Fragment(b"[" + b",".join(parts) + b"]")


JSON_TYPE = ((b"content-type", b"application/json"),)


def json_body(value) -> bytes:
    return orjson.dumps(value, option=JSON_OPTIONS)
