"""Wire <-> numpy for requests and answers: decode and encode of raw and typed contents against
a model's signature, with checks whose messages name model and tensor, and sizes counted against
the request limits before any element is converted."""

import numpy as np

from server.bytes_codec import bytes_from_contents, deserialize_bytes, object_array, serialize_bytes
from server.errors import InvalidInput, shown
from server.frontend.request_limits import (
    DEFAULT_LIMITS,
    RequestLimits,
    bytes_budget,
    declared_count,
    shape_text,
    typed_budget,
)
from server.tensors import DATATYPES, Datatype, DecodedRequest, Signature, TensorSpec


def decode_request(request, signature: Signature, limits: RequestLimits = DEFAULT_LIMITS, raw=None) -> DecodedRequest:
    """Turn a ModelInferRequest into numpy feeds checked against the signature.

    Runs for every request, so the checks that pass are cheap; a check that fails goes through
    the slower functions below, whose messages name model, tensor, expected and actual. Sizes are
    checked against the shape before any element is converted. `raw`: the raw contents, when the
    caller has them apart from the message (grpc_codec keeps them as views of the wire bytes)."""
    inputs = request.inputs
    raw = request.raw_input_contents if raw is None else raw
    if raw and len(raw) != len(inputs):
        raise InvalidInput(
            f"{signature.label}: {len(raw)} raw_input_contents for {len(inputs)} inputs; expected one per input"
        )
    specs, max_batch = signature.input_specs, signature.max_batch_size
    budget, typed = bytes_budget(limits), typed_budget(limits)
    feeds: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(inputs):
        name = tensor.name
        spec = specs.get(name) or signature.input(name)  # input() raises, naming the model's inputs
        if name in feeds:
            raise InvalidInput(f"{signature.label}: input '{name}' appears twice")
        where = _where(signature, name)
        if len(tensor.shape) != len(spec.shape):  # before a shape of a million dims becomes a tuple
            check_shape(tensor.shape, spec, signature, where)
        shape = tuple(tensor.shape)
        datatype = DATATYPES.get(tensor.datatype)
        if datatype is None or tensor.datatype != spec.datatype or not _fits(shape, spec.shape, max_batch):
            datatype = checked_datatype(tensor.datatype, spec, where)
            check_shape(shape, spec, signature, where)
        count = declared_count(shape, where)
        if datatype.numpy is None:
            budget.spend(count, where)
        if not raw:
            if datatype.numpy is not None:
                typed.spend(count, where)
            feeds[name] = from_contents(tensor.contents, datatype, shape, where)
            continue
        if tensor.HasField("contents") and tensor.contents.ListFields():
            raise InvalidInput(f"{where}: has typed contents while the request uses raw_input_contents; use one")
        buffer = raw[index]
        if datatype.numpy is not None and len(buffer) == count * datatype.numpy.itemsize:
            feeds[name] = np.frombuffer(buffer, dtype=datatype.numpy).reshape(shape)
        else:  # BYTES, or a size that does not match: from_raw says how
            feeds[name] = from_raw(buffer, datatype, shape, where)
    if len(feeds) != len(specs):
        missing = [s.name for s in signature.inputs if s.name not in feeds]
        raise InvalidInput(
            f"{signature.label}: missing inputs {missing}; the model needs {Signature._names(signature.inputs)}"
        )
    asked = request.outputs[: len(signature.output_names) + 1]  # see requested_outputs
    outputs = requested_outputs([o.name for o in asked], signature)
    return DecodedRequest(feeds=feeds, rows=batch_rows(feeds, signature), outputs=outputs)


def requested_outputs(names: list[str], signature: Signature) -> tuple[str, ...]:
    """The outputs asked for (all when none are named), each at most once: no request may have one
    output encoded a million times over. Callers pass at most one name more than the model has
    outputs: among those, one is unknown or repeated, which is all there is to say."""
    if not names:
        return signature.output_names
    seen = set()
    for name in names:
        if name not in signature.output_names:
            signature.output(name)  # raises, naming the model's outputs
        if name in seen:
            raise InvalidInput(f"{signature.label}: output '{name}' is requested more than once")
        seen.add(name)
    return tuple(names)


def _where(signature: Signature, name: str) -> str:
    return f"{signature.label}: input '{name}'"


def _fits(shape: tuple[int, ...], want: tuple[int, ...], max_batch_size: int) -> bool:
    """Whether check_shape would pass, without building its messages."""
    if len(shape) != len(want):
        return False
    for dim, expected in zip(shape, want):
        if dim < 0 or (expected != -1 and dim != expected):
            return False
    return not max_batch_size or 1 <= shape[0] <= max_batch_size


def checked_datatype(wire: str, spec: TensorSpec, where: str) -> Datatype:
    datatype = DATATYPES.get(wire)
    if datatype is None:
        raise InvalidInput(f"{where}: unknown datatype '{shown(wire)}'; expected {spec.datatype}")
    if wire != spec.datatype:
        raise InvalidInput(f"{where}: datatype {wire} does not match the model's {spec.datatype}")
    return datatype


def check_shape(shape: tuple[int, ...], spec: TensorSpec, signature: Signature, where: str) -> None:
    expected, shown_shape = list(spec.shape), shape_text(shape)
    if len(shape) != len(spec.shape):
        hint = ""
        if signature.max_batch_size == 0 and len(shape) == len(spec.shape) + 1:
            hint = " (this model has no batch dimension: send the tensor without one)"
        raise InvalidInput(f"{where}: shape {shown_shape} has {len(shape)} dims; expected {expected}{hint}")
    for dim, want in zip(shape, spec.shape):
        if dim < 0:
            raise InvalidInput(f"{where}: shape {shown_shape} has a negative dimension; expected {expected}")
        if want != -1 and dim != want:
            raise InvalidInput(f"{where}: shape {shown_shape} does not match the model's {expected}")
    if signature.max_batch_size:
        batch = shape[0]
        if batch < 1 or batch > signature.max_batch_size:
            raise InvalidInput(f"{where}: batch size {batch} is outside 1..max_batch_size ({signature.max_batch_size})")


def batch_rows(feeds: dict[str, np.ndarray], signature: Signature) -> int:
    if not signature.max_batch_size:
        return 1
    arrays = iter(feeds.values())
    rows = next(arrays).shape[0]
    if any(array.shape[0] != rows for array in arrays):
        batch_sizes = {name: array.shape[0] for name, array in feeds.items()}
        raise InvalidInput(f"{signature.label}: inputs disagree on the batch size: {batch_sizes}")
    return rows


def from_raw(buffer: bytes, datatype: Datatype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A checked shape's tensor from raw contents. BYTES elements must have been counted against
    RequestLimits.max_bytes_elements (a bytes_budget) before: this builds them."""
    count = declared_count(shape, where)
    if datatype.numpy is None:
        return object_array(deserialize_bytes(buffer, count, where), shape)
    expected = count * datatype.numpy.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"{where}: raw content is {len(buffer)} bytes; expected {expected} "
            f"(shape {shape_text(shape)} x {datatype.wire} of {datatype.numpy.itemsize} bytes)"
        )
    return np.frombuffer(buffer, dtype=datatype.numpy).reshape(shape)


def from_contents(contents, datatype: Datatype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Typed contents: counted against the shape before a single value is converted."""
    if datatype.contents_field is None:
        raise InvalidInput(f"{where}: {datatype.wire} has no typed contents field; send it as raw_input_contents")
    values = getattr(contents, datatype.contents_field)
    count = declared_count(shape, where)
    if len(values) != count:
        present = [f.name for f, _ in contents.ListFields()] or ["none"]
        raise InvalidInput(
            f"{where}: {len(values)} values in {datatype.contents_field}; expected {count} for shape "
            f"{shape_text(shape)} (contents present: {', '.join(present)})"
        )
    if datatype.numpy is None:
        return bytes_from_contents(values, shape, where)
    wide = np.array(values)  # as sent: int_contents holds INT8 and INT16 values in 32 bits
    return narrowed(wide, datatype, f"{where}: {datatype.contents_field}").reshape(shape)


def narrowed(wide: np.ndarray, datatype: Datatype, where: str) -> np.ndarray:
    """`wide` as the datatype's numpy type, refusing what the conversion would change silently."""
    target = datatype.numpy
    if np.issubdtype(target, np.integer) and wide.size:
        if wide.dtype.kind not in "iub":
            raise InvalidInput(f"{where} holds {wide.dtype.name} values; {datatype.wire} needs integers")
        info, low, high = np.iinfo(target), wide.min(), wide.max()
        if low < info.min or high > info.max:  # numpy would wrap it silently: 300 as INT8 is 44
            outside = low if low < info.min else high
            raise InvalidInput(f"{where} holds {outside}, outside {datatype.wire}'s {info.min}..{info.max}")
    elif target.kind == "b" and wide.size and wide.dtype.kind != "b":
        raise InvalidInput(f"{where} holds {wide.dtype.name} values; BOOL needs true or false")
    return wide.astype(target, copy=False)


def output_bytes(datatype: str, array: np.ndarray) -> bytearray | memoryview:
    """One output as raw contents, little-endian numbers or length-prefixed BYTES, without a copy
    where there need be none: whoever writes the response copies it once, into the response."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
