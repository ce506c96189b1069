"""libcudart through ctypes: the few CUDA runtime calls the server makes itself, for Triton's CUDA
shared memory (server/frontend/cuda_regions.py) and for sequence state kept on the device
(server/engine/device_state.py). Loaded when first needed, never at import: without a GPU the
loader raises CudaError saying why."""

import ctypes
import importlib.util
from contextlib import suppress
from pathlib import Path

import numpy as np

HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t): CUDA_IPC_HANDLE_SIZE
LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess, the only flag cudaIpcOpenMemHandle takes
HOST_TO_DEVICE, DEVICE_TO_HOST, ANY_DIRECTION = 1, 2, 4  # cudaMemcpyKind (4: cudaMemcpyDefault, by address)
SONAMES = ("libcudart.so.13", "libcudart.so.12")  # what onnxruntime-gpu's CUDA 13 and 12 builds link


class CudaError(Exception):
    """A CUDA call failed, or the runtime is missing; the text names the call and CUDA's reason."""


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_SIZE)]


class CudaRuntime:
    """libcudart's few calls, each setting the region's device first: the current device is per
    host thread, and copies run on whichever thread the caller picks. Its six public methods before
    `copy` are all a region uses: tests pass an object with the same ones over host memory."""

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

    def copy(self, device_id: int, parts: list[tuple[int, int, int]]) -> None:
        """(destination, source, bytes) copies, each pointer on the device or in host memory (unified
        addressing tells which), landed on return: onnxruntime's CUDA stream, which reads them next,
        does not wait for the legacy default stream these run on."""
        self.call("cudaSetDevice", device_id)
        for destination, source, size in parts:
            self.call("cudaMemcpy", destination, source, size, ANY_DIRECTION)
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
