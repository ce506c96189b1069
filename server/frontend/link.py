"""The link between a front-end process and the engine's: frames over a Unix socket.

A frame is its length, its kind, the number of the request (or call) it belongs to, a JSON head
and a body of bytes. Tensors travel in the body, one after another, each described in the head by
name, datatype, shape and size: numbers as their little-endian bytes, BYTES in the wire's
length-prefixed form; from 64 KiB on, in shared memory instead (link_shm.py). Measured
(bench/ipc.py, 2 cores): a round trip costs each side about 5 us of CPU over a Unix socket,
against 20 over ZeroMQ; tensor bytes inside the frames cost little at a few KiB and ten times what
shared memory costs at 600 KiB.
"""

import asyncio
import struct
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import orjson

from server.bytes_codec import deserialize_bytes, object_array, serialize_bytes
from server.frontend import link_shm
from server.frontend.link_shm import SharedTensors
from server.tensors import DATATYPES, Signature, TensorSpec

BUNDLE = 0  # either way: several frames, their heads in one list (Outbox)
# Front end -> engine
REQUEST, RESOLVE, INFER, END, REFUSED, CANCEL, CALL, FORGOTTEN = 1, 2, 3, 4, 5, 6, 7, 8
# Engine -> front end
REPLY, ANSWER, ERROR, STATE, REGIONS_GONE = 11, 12, 13, 14, 15

PREFIX = struct.Struct("<I")  # the length of the rest of the frame
HEADER = struct.Struct("<BQI")  # kind, number, length of the JSON head
MAX_FRAME = 1 << 31  # a bound on what the other side may make this one read: grpc's own message cap is below it
COPY_BELOW = 4096  # tensors smaller than this are copied into the frame rather than viewed
BUNDLE_BYTES = 1 << 22  # of bodies in one bundle: past it, the next frames go in another
BY_NUMPY = {datatype.numpy: datatype.wire for datatype in DATATYPES.values() if datatype.numpy is not None}


class Outbox:
    """Frames sent once per turn of the loop, together. A transport sends each write at once, a
    system call (and a wake-up of the other process) per frame; and each frame costs both sides
    its header and its own JSON. The frames one turn produces go out as one BUNDLE: their heads
    in one JSON list, their bodies one after another (cut at BUNDLE_BYTES of body)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport, self.pending = transport, []
        self.loop = asyncio.get_running_loop()

    def put(self, kind: int, number: int, head: object, body: list) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append((kind, number, head, body))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending or self.transport.is_closing():
            return
        buffers, heads, bodies, size = [], [], [], 0
        for kind, number, head, body in pending:
            length = sum(map(len, body))
            if heads and size + length > BUNDLE_BYTES:
                buffers += _bundle(heads, bodies)
                heads, bodies, size = [], [], 0
            heads.append((kind, number, head, length))
            bodies += body
            size += length
        buffers += _bundle(heads, bodies)
        self.transport.writelines(buffers)


def _bundle(heads: list, bodies: list) -> list:
    if len(heads) == 1:
        kind, number, head, _ = heads[0]
        return frame(kind, number, head, bodies)
    return frame(BUNDLE, 0, heads, bodies)


class LinkBroken(Exception):
    """The other process closed the link, or sent what is not a frame."""


Received = Callable[[int, int, object, memoryview], None]  # (kind, number, head, body)


class Frames(asyncio.Protocol):
    """One end of the link: each frame handed to `received` as soon as its last byte arrives, all
    the frames of one read in one go, without a coroutine per frame (the engine reads every front
    end's requests: this is its hot path). `lost` is called once, with LinkBroken, when the link
    closes or the other side sends what is not a frame.

    With `pause_reading_when_blocked`, the other side is not read while what this side sends it
    waits unread past `high_water` bytes: a front end that does not read its answers is not read
    either. Only one end may do that (the engine): two that both did could wait on each other."""

    def __init__(
        self,
        received: Received,
        lost: Callable[[LinkBroken], None],
        high_water: int = 0,
        connected: Callable[[], None] = lambda: None,
    ) -> None:
        self.received, self.lost, self.high_water, self.connected = received, lost, high_water, connected
        self.partial = bytearray()  # the start of a frame whose end has not arrived
        self.wanted = 0  # bytes `partial` must hold before it is parsed again
        self.transport: asyncio.Transport | None = None
        self.outbox: Outbox | None = None
        self.why_lost: LinkBroken | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.outbox = transport, Outbox(transport)
        if self.high_water:
            transport.set_write_buffer_limits(high=self.high_water)
        self.connected()

    def send(self, kind: int, number: int, head: object = None, body: Iterable = ()) -> None:
        self.outbox.put(kind, number, head, body if isinstance(body, list) else list(body))

    def pause_writing(self) -> None:
        if self.high_water:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.high_water and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.partial:
            self.partial += data
            if len(self.partial) < self.wanted:  # a big frame still arriving: no copy per read
                return
            data = bytes(self.partial)
            self.partial.clear()
        view, offset, end = memoryview(data), 0, len(data)
        while end - offset >= PREFIX.size:
            (length,) = PREFIX.unpack_from(view, offset)
            if not HEADER.size <= length <= MAX_FRAME:
                self.close(f"a frame of {length} bytes")
                return
            if end - offset - PREFIX.size < length:
                break
            start, offset = offset + PREFIX.size, offset + PREFIX.size + length
            kind, number, head_length = HEADER.unpack_from(view, start)
            body_start = start + HEADER.size + head_length
            head = orjson.loads(view[start + HEADER.size : body_start]) if head_length else None
            if kind == BUNDLE:
                self._unbundle(head, view[body_start:offset])
            else:
                self.received(kind, number, head, view[body_start:offset])
            if self.why_lost is not None:  # a frame closed the link
                return
        if offset < end:
            self.partial += view[offset:]
            # What the partial frame needs before it is worth parsing: its length, then all of it.
            self.wanted = PREFIX.size + (PREFIX.unpack_from(view, offset)[0] if end - offset >= PREFIX.size else 0)

    def _unbundle(self, heads: list, body: memoryview) -> None:
        offset = 0
        for kind, number, head, length in heads:
            self.received(kind, number, head, body[offset : offset + length])
            offset += length
            if self.why_lost is not None:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(LinkBroken(str(exc) if exc else "closed"))

    def close(self, why: str) -> None:
        self._lost(LinkBroken(why))
        self.transport.close()

    def _lost(self, why: LinkBroken) -> None:
        if self.why_lost is None:
            self.why_lost = why
            self.lost(why)


def frame(kind: int, number: int, head: object = None, body: Iterable[bytes | memoryview] = ()) -> list:
    """The buffers of one frame, for a transport's writelines."""
    encoded = orjson.dumps(head) if head is not None else b""
    parts = list(body)
    length = HEADER.size + len(encoded) + sum(len(part) for part in parts)
    return [PREFIX.pack(length) + HEADER.pack(kind, number, len(encoded)) + encoded, *parts]


def pack_tensors(arrays: Mapping[str, np.ndarray], shared: SharedTensors | None = None) -> tuple[list, list]:
    """(their description for the head, their bytes for the body); with `shared`, big ones go
    through shared memory instead, under the name their description gives."""
    specs, body = [], []
    for name, array in arrays.items():
        if array.dtype == object:
            data, wire = serialize_bytes(array), "BYTES"
        elif array.nbytes < COPY_BELOW:  # one call: cheaper than a view's three at this size
            data, wire = array.tobytes(), BY_NUMPY[array.dtype]
        else:
            data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # empty ones too
            wire = BY_NUMPY[array.dtype]
        where = shared.put(data) if shared is not None else ""
        specs.append((name, wire, list(array.shape), len(data), where))
        if not where:
            body.append(data)
    return specs, body


def unpack_tensors(specs: list, body: memoryview) -> dict[str, np.ndarray]:
    """Arrays over the body's bytes or shared memory (numbers without a copy), as pack_tensors
    described them. Every shared name is taken or unlinked, whatever fails."""
    arrays, offset = {}, 0
    try:
        for name, wire, shape, size, where in specs:
            if where:
                data = link_shm.take(where, size)
            else:
                data, offset = body[offset : offset + size], offset + size
            datatype = DATATYPES[wire]
            if datatype.numpy is None:
                count = int(np.prod(shape, dtype=np.int64))
                arrays[name] = object_array(deserialize_bytes(data, count, f"tensor '{name}'"), tuple(shape))
            else:
                arrays[name] = np.frombuffer(data, dtype=datatype.numpy).reshape(shape)
    except BaseException:
        discard_tensors(specs)
        raise
    return arrays


def discard_tensors(specs: list | None) -> None:
    """Tensors described but not to be unpacked: their shared memory is unlinked."""
    if specs:
        link_shm.discard([spec[4] for spec in specs if spec[4]])


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
