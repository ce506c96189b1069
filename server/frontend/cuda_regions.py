"""Triton's CUDA shared memory extension: device memory a client on the same node allocates
(cudaMalloc), exports (cudaIpcGetMemHandle) and registers by name with the 64 bytes of its
cudaIpcMemHandle_t, a device and a size; requests name it for inputs and outputs, which are copied
from and into device memory here instead of riding in the message. With API keys, a region belongs
to the tenant that registered it. libcudart is reached through ctypes and loaded at the first
registration, never at import: without a GPU, registrations are refused saying why. Copies block
(cudaMemcpy): callers run big ones off the event loop. A region's IPC mapping is closed once it is
unregistered and no copy or `held()` span uses it, so an unregister never pulls memory from under
a request."""

import ctypes
import importlib.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.errors import InvalidInput, shown
from server.frontend.shared_regions import MAX_REGIONS

HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t): CUDA_IPC_HANDLE_SIZE
LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess, the only flag cudaIpcOpenMemHandle takes
HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
SONAMES = ("libcudart.so.13", "libcudart.so.12")  # what onnxruntime-gpu's CUDA 13 and 12 builds link


class CudaError(Exception):
    """A CUDA call failed, or the runtime is missing; the text names the call and CUDA's reason."""


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_SIZE)]


class CudaRuntime:
    """libcudart's few calls, each setting the region's device first: the current device is per
    host thread, and copies run on whichever thread the caller picks. Its six public methods are
    all a region uses: tests pass an object with the same ones over host memory."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library, self._driver = library, None
        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        for name, argtypes in (
            ("cudaGetDeviceCount", [ctypes.POINTER(ctypes.c_int)]),
            ("cudaSetDevice", [ctypes.c_int]),
            ("cudaIpcOpenMemHandle", [ctypes.POINTER(pointer), _IpcMemHandle, ctypes.c_uint]),
            ("cudaIpcCloseMemHandle", [pointer]),
            ("cudaMemcpy", [pointer, pointer, size, ctypes.c_int]),
            ("cudaStreamSynchronize", [pointer]),
        ):
            getattr(library, name).argtypes, getattr(library, name).restype = argtypes, ctypes.c_int
        library.cudaGetErrorString.argtypes, library.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p

    def call(self, name: str, *args) -> None:
        """One libcudart call; its failure as CudaError, in CUDA's words."""
        status = getattr(self.library, name)(*args)
        if status != 0:
            text = (self.library.cudaGetErrorString(status) or b"unknown error").decode(errors="replace")
            raise CudaError(f"{name}: {text} (cudaError {status})")

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        self.call("cudaGetDeviceCount", ctypes.byref(count))  # fails, rather than says 0, without a driver
        return count.value

    def open(self, device_id: int, handle: bytes) -> int:
        pointer = ctypes.c_void_p()
        self.call("cudaSetDevice", device_id)  # the handle maps into this device's context
        self.call("cudaIpcOpenMemHandle", pointer, _IpcMemHandle.from_buffer_copy(handle), LAZY_ENABLE_PEER_ACCESS)
        return pointer.value or 0

    def allocation_size(self, device_id: int, pointer: int) -> int:
        """Bytes from `pointer` to the end of its allocation, from the driver, as Triton checks
        byte_size: past it, copies would read and write the server's own device memory."""
        try:  # libcuda.so.1, the driver, is in the process already: libcudart loaded it
            function = self._driver or ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2  # cuda.h's name for it
        except (OSError, AttributeError) as err:
            raise CudaError(f"cuMemGetAddressRange: {err}") from None
        function.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        function.restype, self._driver = ctypes.c_int, function
        self.call("cudaSetDevice", device_id)
        base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
        if status := function(ctypes.byref(base), ctypes.byref(size), pointer):
            raise CudaError(f"cuMemGetAddressRange: CUresult {status}")
        return size.value - (pointer - base.value)

    def close(self, device_id: int, pointer: int) -> None:
        self.call("cudaSetDevice", device_id)
        self.call("cudaIpcCloseMemHandle", pointer)

    def to_host(self, device_id: int, pointer: int, size: int) -> bytearray:
        host = bytearray(size)
        self.call("cudaSetDevice", device_id)
        self.call("cudaMemcpy", np.frombuffer(host, dtype=np.uint8).ctypes.data, pointer, size, DEVICE_TO_HOST)
        return host

    def to_device(self, device_id: int, pointer: int, data: memoryview) -> None:
        source = np.frombuffer(data, dtype=np.uint8)  # the address of read-only buffers too, with no copy
        self.call("cudaSetDevice", device_id)
        self.call("cudaMemcpy", pointer, source.ctypes.data, len(data), HOST_TO_DEVICE)
        # From pageable memory cudaMemcpy returns once the bytes are staged, not landed, and the
        # client reads them from its own process as soon as the response arrives.
        self.call("cudaStreamSynchronize", None)


def load_runtime() -> CudaRuntime:
    """libcudart: the one in this process already, else by soname, else from NVIDIA's wheels."""
    tried = []
    for candidate in _libcudart_candidates():
        try:
            return CudaRuntime(ctypes.CDLL(candidate))
        except (OSError, AttributeError) as err:  # not there, or a libcudart without a call used here
            tried.append(str(err))
    raise CudaError(f"the CUDA runtime (libcudart) is not installed: {'; '.join(tried)}")


def _libcudart_candidates() -> list[str]:
    """The front end may not import the engine (nor, in a front-end process, onnxruntime), so
    server/engine/cuda_libraries.py's preload() is not called from here: the libcudart it loaded
    into this process comes first (one runtime, the engine's), then the sonames the loader finds,
    then NVIDIA's wheels where preload() looks (site-packages/nvidia/cu13/lib, cu12/lib,
    cuda_runtime/lib), the newest first."""
    loaded = []
    with suppress(OSError):
        maps = Path("/proc/self/maps").read_text().splitlines()
        loaded = sorted({line.split()[-1] for line in maps if "/libcudart.so." in line})
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(root) for root in (spec.submodule_search_locations or [])] if spec else []
    wheels = [
        str(path)
        for root in roots
        for path in sorted(root.glob("*/lib/libcudart.so.*"), key=lambda p: p.name, reverse=True)
    ]
    return [*loaded, *SONAMES, *wheels]


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
