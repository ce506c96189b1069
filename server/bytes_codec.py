"""BYTES tensors on the wire and in numpy: per element a 4-byte little-endian length, then the bytes
(raw contents), or one protobuf `bytes` per element (typed contents); in numpy an object array of
str, which is all onnxruntime takes for a string tensor (it str()s a bytes object).

The element count is checked before anything is built, and parsing stops at the count the shape
declares: a buffer holding more elements is refused after count + 1 of them, not after all."""

import struct

import numpy as np

from server.errors import InvalidInput

_LENGTH = struct.Struct("<I")
# Elements put into an object array per numpy call: such a call holds the GIL throughout (~15-20 ns
# an element), so a codec thread filling a million of them lets the event loop in every ~1 ms.
CHUNK = 1 << 16


def deserialize_bytes(buffer: bytes, count: int, where: str) -> list[str]:
    """The `count` elements of a raw BYTES buffer, as str; InvalidInput unless there are exactly
    that many, each whole and UTF-8.

    One short Python step per element (~0.2 us; the length prefixes chain, so numpy cannot find the
    offsets) and none past `count`: the cost is bounded by the shape, not by the buffer."""
    if not isinstance(buffer, bytes):
        buffer = bytes(buffer)  # slices of bytes are the cheapest element copies to decode from
    unpack, size = _LENGTH.unpack_from, len(buffer)
    items: list[str] = []  # grown, not sized by `count`: the buffer, not the shape, says how many there are
    append, offset = items.append, 0
    try:
        for index in range(count):
            if offset + 4 > size:
                raise InvalidInput(_short(where, index, count, offset, size))
            start = offset + 4
            offset = start + unpack(buffer, offset)[0]
            if offset > size:
                raise InvalidInput(
                    f"{where}: BYTES element {index} declares {offset - start} bytes but only {size - start} remain"
                )
            append(buffer[start:offset].decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInput(f"{where}: BYTES element {index} is not valid UTF-8 (ONNX strings are UTF-8)") from None
    if offset != size:
        raise InvalidInput(
            f"{where}: raw BYTES content holds more than {count} elements ({size - offset} bytes are left after "
            f"{count}); the shape needs {count}"
        )
    return items


def _short(where: str, index: int, count: int, offset: int, size: int) -> str:
    if offset == size:
        return f"{where}: raw BYTES content holds {index} elements; the shape needs {count}"
    return f"{where}: BYTES element {index} has a truncated 4-byte length prefix"


def object_array(items: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """`items` as an object array of `shape`, CHUNK elements per numpy call."""
    array = np.empty(len(items), dtype=object)
    for start in range(0, len(items), CHUNK):
        array[start : start + CHUNK] = items[start : start + CHUNK]
    return array.reshape(shape)


def bytes_from_contents(values, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Typed `bytes_contents` (already counted against the shape) as an object array of str."""
    array = np.empty(len(values), dtype=object)
    try:
        for start in range(0, len(values), CHUNK):
            array[start : start + CHUNK] = [value.decode("utf-8") for value in values[start : start + CHUNK]]
    except UnicodeDecodeError:
        index = next(i for i, value in enumerate(values) if not _is_utf8(value))
        raise InvalidInput(f"{where}: BYTES element {index} is not valid UTF-8 (ONNX strings are UTF-8)") from None
    return array.reshape(shape)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def serialize_bytes(array: np.ndarray) -> bytearray:
    """Raw BYTES contents of an object array of str (or bytes): one growing buffer, no list of
    parts (two small objects per element), and no final copy into bytes."""
    pack = _LENGTH.pack
    out = bytearray()
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        out += pack(len(data))
        out += data
    return out
