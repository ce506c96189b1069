"""A sequence's implicit state kept on the device of the instance that runs it, between requests.

An instance that runs through IO binding (binding.bound_run: CUDA's default, the CPU's with
parameters['io_binding'] "1") leaves a state output where the provider wrote it, an OrtValue on the
instance's device, and each sequence keeps its own rows of it (DeviceRows). The next batch's state
input is gathered from those rows on the device (Gathered): one copy per sequence, device to device,
never through the host; a state fresh from START (host memory) is copied up in the same gather, and
a batch of one sequence whose rows are a whole output is bound as it is, with no copy at all. A
sequence holds its batch's output until it runs again: at most one output per live sequence.
Where the instance cannot bind (session.run, fixed or graph bindings), no output is left on the
device (runtime.InstancePool.keep_on_device): the state is host memory there all along.

No onnxruntime import: the batch's request vocabulary (queued.py) imports this module, and front-end
processes import that without onnxruntime."""

import ctypes
from dataclasses import dataclass

import numpy as np

from server.errors import ExecutionFailed
from server.tensors import DATATYPE_BY_ORT


@dataclass(frozen=True, slots=True)
class DeviceRows:
    """Rows [start, start + rows) of an output left on its device (an onnxruntime OrtValue); rows
    -1: the whole output, whatever its shape (a model that does not batch)."""

    value: object
    start: int = 0
    rows: int = -1

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.value.shape())
        return shape if self.rows < 0 else (self.rows, *shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return DATATYPE_BY_ORT[self.value.data_type()].numpy

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def whole(self) -> bool:
        return self.rows < 0 or (self.start == 0 and self.rows == self.value.shape()[0])

    def pointer(self) -> int:
        row_bytes = self.nbytes // self.rows if self.rows > 0 else 0
        return self.value.data_ptr() + self.start * row_bytes

    def host(self) -> np.ndarray:
        """A copy in host memory (a GPU instance's rows riding a CPU one's batch, or a reload)."""
        array = self.value.numpy()
        return array if self.rows < 0 else np.array(array[self.start : self.start + self.rows], copy=True)


@dataclass(frozen=True, slots=True)
class Gathered:
    """A batch's input as its requests' parts in row order, host arrays and DeviceRows: gathered
    into one tensor on the instance's device just before the run."""

    parts: tuple[np.ndarray | DeviceRows, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        return (sum(part.shape[0] for part in self.parts), *first[1:])

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def on_device(self, ort, device: str, copies: "DeviceCopies", name: str):
        """One OrtValue on `device` holding every part, in order; `ort` is onnxruntime."""
        if len(self.parts) == 1 and isinstance(self.parts[0], DeviceRows) and self.parts[0].whole:
            return self.parts[0].value  # a batch of one sequence: its state is bound where it is
        self._check(name)
        kind, _, index = device.partition(":")
        target = ort.OrtValue.ortvalue_from_shape_and_type(list(self.shape), self.dtype, kind, int(index or 0))
        kept, offset, plan = [], target.data_ptr(), []
        for part in self.parts:
            if isinstance(part, DeviceRows) and copies.on_cpu and part.value.device_name() != "cpu":
                part = part.host()  # a sequence that ran on a GPU instance now rides a CPU one's batch
            if isinstance(part, np.ndarray):
                part = np.ascontiguousarray(part)
                kept.append(part)  # alive until the copies are done
                source = part.ctypes.data
            else:
                source = part.pointer()
            plan.append((offset, source, part.nbytes))
            offset += part.nbytes
        copies.run(plan)
        return target

    def _check(self, name: str) -> None:
        first = self.parts[0]
        for part in self.parts[1:]:
            if part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
                raise ExecutionFailed(
                    f"state '{name}': sequences' states of shapes {list(first.shape[1:])} and "
                    f"{list(part.shape[1:])} ({first.dtype}, {part.dtype}) cannot share a batch"
                )


class DeviceCopies:
    """Copies into and between rows on one instance's device: memmove for the CPU, libcudart's
    cudaMemcpy for CUDA (loaded at the first copy; onnxruntime has loaded it by then)."""

    def __init__(self, device: str) -> None:
        kind, _, index = device.partition(":")
        self.on_cpu, self.index, self.runtime = kind == "cpu", int(index or 0), None

    def run(self, plan: list[tuple[int, int, int]]) -> None:
        """(destination, source, bytes) each; landed on return."""
        if self.on_cpu:
            for destination, source, size in plan:
                ctypes.memmove(destination, source, size)
            return
        if self.runtime is None:
            from server.cuda_runtime import load_runtime  # only where a device holds state

            self.runtime = load_runtime()
        self.runtime.copy(self.index, plan)


def gather(parts: list) -> np.ndarray | Gathered:
    """One input of a batch from its requests' parts: concatenated on the host, unless a part
    lives on the device."""
    if any(isinstance(part, DeviceRows) for part in parts):
        return Gathered(tuple(parts))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def rows_of(value, start: int, end: int):
    """A request's rows of a batch's output: a view of a host array, DeviceRows of a device one."""
    if isinstance(value, np.ndarray):
        return value[start:end]
    return DeviceRows(value, start, end - start)


def shape_of(value) -> tuple[int, ...]:
    return value.shape if isinstance(value, np.ndarray) else tuple(value.shape())


def held(value):
    """A sequence's own state from its rows of a batch's output: host rows copied out (else the whole
    batch's array would stay), device rows as they are (their output stays until the sequence runs)."""
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    return value if isinstance(value, DeviceRows) else DeviceRows(value)  # a batch of one: its whole output


def to_host(value):
    """A state on the host: device rows copied down (a reload: the new instances may be elsewhere)."""
    return value.host() if isinstance(value, DeviceRows) else value
