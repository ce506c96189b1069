"""The load generator's shared memory mode (`python -m bench.loadgen --shared-memory`): each caller
gets a POSIX shared memory region of its own, holding its request's inputs and room for its
outputs, registered with the server (Triton's SystemSharedMemoryRegister); its request names them
there and carries no tensor bytes, both ways. Standard library and the server's protocol module
only: tritonclient is not needed."""

import os
from pathlib import Path

import grpc
import numpy as np

from server import protocol
from server.tensors import DATATYPES
from server.tools.loadgen import model_metadata

SHARED_MEMORY = Path("/dev/shm")


class CallerRegions:
    """Registered regions, one per caller, and the requests that name them; `close()` unregisters
    and removes them."""

    def __init__(self, url: str, model: str, payload: bytes, callers: int) -> None:
        self.url, self.names, self.paths, self.payloads = url, [], [], []
        request = protocol.ModelInferRequest.FromString(payload)
        outputs = _output_sizes(url, model, request)
        for caller in range(callers):
            name = f"loadgen-{os.getpid()}-{caller}"
            path = SHARED_MEMORY / name
            inputs = [bytes(raw) for raw in request.raw_input_contents]
            size = sum(map(len, inputs)) + sum(outputs.values())
            path.write_bytes(b"".join(inputs) + bytes(sum(outputs.values())))
            self.paths.append(path)
            self._register(name, f"/{name}", size)
            self.payloads.append(_naming(request, name, [len(raw) for raw in inputs], outputs))

    def _register(self, name: str, key: str, size: int) -> None:
        with grpc.insecure_channel(self.url) as channel:
            register = protocol.unary(channel, "SystemSharedMemoryRegister")
            register(
                protocol.request_class("SystemSharedMemoryRegister")(name=name, key=key, byte_size=size), timeout=10
            )
        self.names.append(name)

    def close(self) -> None:
        with grpc.insecure_channel(self.url) as channel:
            unregister = protocol.unary(channel, "SystemSharedMemoryUnregister")
            for name in self.names:
                unregister(protocol.request_class("SystemSharedMemoryUnregister")(name=name), timeout=10)
        for path in self.paths:
            path.unlink(missing_ok=True)


def _output_sizes(url: str, model: str, request) -> dict[str, int]:
    """Bytes of each output for the request's batch, from the model's metadata."""
    rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
    sizes = {}
    for spec in model_metadata(url, model).outputs:
        dims = [rows if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(spec.shape)]
        sizes[spec.name] = int(np.prod(dims)) * DATATYPES[spec.datatype].numpy.itemsize
    return sizes


def _naming(request, region: str, input_sizes: list[int], outputs: dict[str, int]) -> bytes:
    """The request with its inputs and outputs in `region`, one after another, and no raw contents."""
    named = protocol.ModelInferRequest()
    named.CopyFrom(request)
    del named.raw_input_contents[:]
    offset = 0
    for tensor, size in zip(named.inputs, input_sizes):
        _place(tensor.parameters, region, offset, size)
        offset += size
    for name, size in outputs.items():
        _place(named.outputs.add(name=name).parameters, region, offset, size)
        offset += size
    return named.SerializeToString()


def _place(parameters, region: str, offset: int, size: int) -> None:
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_offset"].int64_param = offset
    parameters["shared_memory_byte_size"].int64_param = size
