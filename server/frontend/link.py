"""The link between a front-end process and the engine's: frames over a Unix socket.

A frame is its length, its kind, the number of the request (or call) it belongs to, a JSON head
and a body of bytes. Tensors travel in the body, one after another, each described in the head by
name, datatype, shape and size: numbers as their little-endian bytes, BYTES in the wire's
length-prefixed form. Measured (bench/ipc.py, 2 cores): a round trip costs each side about 5 us
of CPU over a Unix socket, against 20 over ZeroMQ; tensor bytes inside the frames cost little
at a few KiB and ten times what shared memory costs at 600 KiB, which is where shared memory
will take over.
"""

import asyncio
import struct
from collections.abc import Iterable, Mapping

import numpy as np
import orjson

from server.bytes_codec import deserialize_bytes, object_array, serialize_bytes
from server.tensors import DATATYPES, Signature, TensorSpec

# Front end -> engine
REQUEST, RESOLVE, INFER, END, REFUSED, CANCEL, CALL = 1, 2, 3, 4, 5, 6, 7
# Engine -> front end
REPLY, ANSWER, ERROR, STATE = 11, 12, 13, 14

PREFIX = struct.Struct("<I")  # the length of the rest of the frame
HEADER = struct.Struct("<BQI")  # kind, number, length of the JSON head
MAX_FRAME = 1 << 31  # a bound on what the other side may make this one read: grpc's own message cap is below it
BY_NUMPY = {datatype.numpy: datatype.wire for datatype in DATATYPES.values() if datatype.numpy is not None}


class Outbox:
    """Frames sent once per turn of the loop. asyncio sends each write at once, a system call (and
    a wake-up of the other process) per frame; the frames that one turn produces go out together."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer, self.pending = writer, []
        self.loop = asyncio.get_running_loop()

    def put(self, buffers: list) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.extend(buffers)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending and not self.writer.is_closing():
            self.writer.writelines(pending)


class LinkBroken(Exception):
    """The other process closed the link, or sent what is not a frame."""


def frame(kind: int, number: int, head: object = None, body: Iterable[bytes | memoryview] = ()) -> list:
    """The buffers of one frame, for a StreamWriter's writelines."""
    encoded = orjson.dumps(head) if head is not None else b""
    parts = list(body)
    length = HEADER.size + len(encoded) + sum(len(part) for part in parts)
    return [PREFIX.pack(length) + HEADER.pack(kind, number, len(encoded)) + encoded, *parts]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, object, memoryview]:
    """(kind, number, head, body); LinkBroken when the link is closed or the frame cannot be one."""
    try:
        (length,) = PREFIX.unpack(await reader.readexactly(PREFIX.size))
        if not HEADER.size <= length <= MAX_FRAME:
            raise LinkBroken(f"a frame of {length} bytes")
        data = memoryview(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError) as err:
        raise LinkBroken(str(err) or "closed") from None
    kind, number, head_length = HEADER.unpack_from(data)
    start = HEADER.size + head_length
    head = orjson.loads(data[HEADER.size : start]) if head_length else None
    return kind, number, head, data[start:]


def pack_tensors(arrays: Mapping[str, np.ndarray]) -> tuple[list, list]:
    """(their description for the head, their bytes for the body)."""
    specs, body = [], []
    for name, array in arrays.items():
        if array.dtype == object:
            data, wire = serialize_bytes(array), "BYTES"
        else:
            data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # empty ones too
            wire = BY_NUMPY[array.dtype]
        specs.append((name, wire, list(array.shape), len(data)))
        body.append(data)
    return specs, body


def unpack_tensors(specs: list, body: memoryview) -> dict[str, np.ndarray]:
    """Arrays over the body's bytes (numbers without a copy), as pack_tensors described them."""
    arrays, offset = {}, 0
    for name, wire, shape, size in specs:
        data = body[offset : offset + size]
        offset += size
        datatype = DATATYPES[wire]
        if datatype.numpy is None:
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = object_array(deserialize_bytes(data, count, f"tensor '{name}'"), tuple(shape))
        else:
            arrays[name] = np.frombuffer(data, dtype=datatype.numpy).reshape(shape)
    return arrays


def signature_head(signature: Signature) -> dict:
    def specs(tensors: tuple[TensorSpec, ...]) -> list:
        return [(spec.name, spec.datatype, list(spec.shape)) for spec in tensors]

    return {
        "model": signature.model,
        "version": signature.version,
        "inputs": specs(signature.inputs),
        "outputs": specs(signature.outputs),
        "max_batch_size": signature.max_batch_size,
    }


def signature_from(head: dict) -> Signature:
    def specs(rows: list) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name, datatype, tuple(shape)) for name, datatype, shape in rows)

    return Signature(
        head["model"], head["version"], specs(head["inputs"]), specs(head["outputs"]), head["max_batch_size"]
    )
