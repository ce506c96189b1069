"""Triton's CUDA shared memory extension: device memory a client on the same node allocates
(cudaMalloc), exports (cudaIpcGetMemHandle) and registers by name with the 64 bytes of its
cudaIpcMemHandle_t, a device and a size; requests name it for inputs and outputs, which are copied
from and into device memory here instead of riding in the message. With API keys, a region belongs
to the tenant that registered it. libcudart is reached through ctypes and loaded at the first
registration, never at import: without a GPU, registrations are refused saying why. Copies block
(cudaMemcpy): callers run big ones off the event loop. A region's IPC mapping is closed once it is
unregistered and no copy or `held()` span uses it, so an unregister never pulls memory from under
a request."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from server.cuda_runtime import HANDLE_SIZE, CudaError, CudaRuntime, load_runtime
from server.errors import InvalidInput, shown
from server.frontend.shared_regions import MAX_REGIONS


class _Mapping:
    """An opened IPC handle and who uses it: closed once, when released and no longer used."""

    def __init__(self, runtime: CudaRuntime, device_id: int, pointer: int) -> None:
        self.runtime, self.device_id, self.pointer = runtime, device_id, pointer
        self.lock, self.uses, self.released, self.closed = threading.Lock(), 0, False, False

    @contextmanager
    def using(self, name: str) -> Iterator[int]:
        with self.lock:
            if self.released:
                raise InvalidInput(f"CUDA shared memory region '{shown(name)}' was unregistered")
            self.uses += 1
        try:
            yield self.pointer
        finally:
            with self.lock:
                self.uses -= 1
            self._close_if_done()

    def release(self) -> None:
        with self.lock:
            self.released = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        with self.lock:
            if not self.released or self.uses or self.closed:
                return
            self.closed = True
        with suppress(CudaError):  # the mapping goes with the process; nobody waits on this close to hear of it
            self.runtime.close(self.device_id, self.pointer)


@dataclass(frozen=True)
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    tenant: str
    _mapping: _Mapping = field(repr=False, compare=False)
    raw_handle: bytes = field(default=b"", repr=False, compare=False)  # for front ends that open it too

    def held(self):
        """A span (`with region.held():`) over which the mapping stays open, unregistered or not."""
        return self._mapping.using(self.name)

    def view(self, offset: int, size: int, what: str) -> memoryview:
        """`size` bytes at `offset`, copied from the device into host memory (writing to the copy
        changes nothing on the device); InvalidInput naming region, offset and size where they do not fit."""
        self._check(offset, size, what)
        if size == 0:
            return memoryview(bytearray())
        with self._mapping.using(self.name) as pointer, _refused(f"{what}: {self._named}"):
            return memoryview(self._mapping.runtime.to_host(self.device_id, pointer + offset, size))

    def write(self, offset: int, data, what: str) -> None:
        """`data` (any buffer) into the region at `offset`, bounds-checked as `view` is."""
        view = memoryview(data)
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        self._check(offset, len(view), what)
        if len(view):
            with self._mapping.using(self.name) as pointer, _refused(f"{what}: {self._named}"):
                self._mapping.runtime.to_device(self.device_id, pointer + offset, view)

    @property
    def _named(self) -> str:
        return f"CUDA shared memory region '{shown(self.name)}'"

    def _check(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise InvalidInput(
                f"{what}: {self._named} holds {self.byte_size} bytes; offset {offset} + size {size} does not fit in it"
            )


class CudaRegions:
    """The registered CUDA regions, by name. The runtime loads at the first register; a failed
    load is tried again at the next."""

    def __init__(self, runtime_loader: Callable[[], CudaRuntime] | None = None) -> None:
        self.loader, self.runtime = runtime_loader or load_runtime, None
        self.regions: dict[str, CudaRegion] = {}
        self.lock, self.pending = threading.Lock(), set()  # names being opened, outside the lock

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int, tenant: str) -> None:
        refuse = f"unable to register CUDA shared memory region '{shown(name)}'"
        _check_request(name, raw_handle, device_id, byte_size, refuse)
        with self.lock:
            if name in self.regions or name in self.pending:
                raise InvalidInput(
                    f"CUDA shared memory region '{shown(name)}' is registered already; unregister it first"
                )
            if len(self.regions) + len(self.pending) >= MAX_REGIONS:
                raise InvalidInput(f"{MAX_REGIONS} CUDA shared memory regions are registered: unregister some first")
            self.pending.add(name)
        try:
            mapping = self._open(raw_handle, device_id, byte_size, refuse)
            with self.lock:
                self.regions[name] = CudaRegion(name, device_id, byte_size, tenant, mapping, bytes(raw_handle))
        finally:
            with self.lock:
                self.pending.discard(name)

    def _open(self, raw_handle: bytes, device_id: int, byte_size: int, refuse: str) -> _Mapping:
        with _refused(refuse):
            runtime = self.runtime = self.runtime or self.loader()
        try:
            count = runtime.device_count()
        except CudaError as err:
            raise InvalidInput(f"{refuse}: no CUDA device is visible to the server ({err})") from None
        if count == 0:
            raise InvalidInput(f"{refuse}: no CUDA device is visible to the server (cudaGetDeviceCount: 0 devices)")
        if device_id >= count:
            raise InvalidInput(f"{refuse}: device_id {device_id} is not one of the {count} devices the server sees")
        with _refused(refuse):
            mapping = _Mapping(runtime, device_id, runtime.open(device_id, bytes(raw_handle)))
        try:
            with _refused(f"{refuse}: the size of the handle's allocation is unknown"):
                size = runtime.allocation_size(device_id, mapping.pointer)
            if byte_size > size:
                raise InvalidInput(
                    f"{refuse}: byte_size {byte_size} is more than the {size} bytes of the handle's allocation"
                )
        except InvalidInput:
            mapping.release()
            raise
        return mapping

    def unregister(self, name: str, tenant: str) -> None:
        """One region, or every region of the tenant when `name` is empty; an unknown name is no error."""
        with self.lock:
            names = [name] if name else [n for n, r in self.regions.items() if r.tenant == tenant]
            gone = [self.regions.pop(n) for n in names if n in self.regions and self.regions[n].tenant == tenant]
        for region in gone:
            region._mapping.release()  # closes now, or when the last copy using it ends

    def status(self, name: str, tenant: str) -> list[CudaRegion]:
        if not name:
            with self.lock:
                return [region for region in self.regions.values() if region.tenant == tenant]
        return [self.get(name, tenant)]

    def get(self, name: str, tenant: str) -> CudaRegion:
        region = self.regions.get(name)
        if region is None or region.tenant != tenant:
            raise InvalidInput(f"unable to find cuda shared memory region: '{shown(name)}'")
        return region

    def close(self) -> None:
        """Every region unregistered, every IPC handle closed (or, where a copy is running, once it ends)."""
        with self.lock:
            gone, self.regions = list(self.regions.values()), {}
        for region in gone:
            region._mapping.release()


def _check_request(name: str, raw_handle: bytes, device_id: int, byte_size: int, refuse: str) -> None:
    if not name:
        raise InvalidInput("a CUDA shared memory region needs a name")
    if len(raw_handle) != HANDLE_SIZE:
        raise InvalidInput(
            f"{refuse}: raw_handle is {len(raw_handle)} bytes; a cudaIpcMemHandle_t is {HANDLE_SIZE} "
            '(over REST it is sent base64-encoded, as {"b64": ...})'
        )
    if device_id < 0:
        raise InvalidInput(f"{refuse}: device_id {device_id} is not a device")
    if byte_size <= 0:
        raise InvalidInput(f"{refuse}: byte_size {byte_size} is not positive")


@contextmanager
def _refused(prefix: str) -> Iterator[None]:
    """CUDA's reason, as the InvalidInput a caller sees."""
    try:
        yield
    except CudaError as err:
        raise InvalidInput(f"{prefix}: {err}") from None
