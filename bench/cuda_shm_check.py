"""Triton's CUDA shared memory against a running onnxserve, as NVIDIA's simple_grpc_cudashm_client.py
and simple_http_cudashm_client.py do it: device buffers allocated in this process (cudaMalloc),
exported (cudaIpcGetMemHandle) and registered with tritonclient's register_cuda_shared_memory; an
inference on the model `simple` (INPUT0, INPUT1 INT32 [1,16] -> OUTPUT0 = sum, OUTPUT1 = difference)
with its inputs and outputs all in those regions; the outputs read back from the device and checked;
the regions unregistered. Over gRPC, then over REST.

    python -m bench.cuda_shm_check --grpc localhost:8001 --http localhost:8000

Needs a GPU on this machine and tritonclient; where either is missing, each protocol's entry says
why instead of "ok". The client's CUDA calls go through tritonclient.utils.cuda_shared_memory where
cuda-python is installed, else through libcudart with ctypes (server/frontend/cuda_regions.py's
loader and copies, plus cudaMalloc, cudaIpcGetMemHandle and cudaFree here). The server must run in
another process: CUDA opens no IPC handle in the process that made it."""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import sys

import numpy as np

MODEL = "simple"
SHAPE = [1, 16]
BYTES = 16 * 4  # INT32 [1,16]


class CtypesMemory:
    """tritonclient.utils.cuda_shared_memory's calls that this check makes, through libcudart."""

    def __init__(self) -> None:
        from server.cuda_runtime import HANDLE_SIZE, CudaError, load_runtime

        self.runtime = load_runtime()  # CudaError, with the reason, where libcudart is missing
        try:
            count = self.runtime.device_count()
        except CudaError as err:
            raise CudaError(f"no CUDA device is visible to the client ({err})") from None
        if count == 0:
            raise CudaError("no CUDA device is visible to the client (cudaGetDeviceCount: 0 devices)")
        self.handle_type = ctypes.c_char * HANDLE_SIZE  # cudaIpcMemHandle_t: char reserved[64]
        library = self.runtime.library
        library.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        library.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(self.handle_type), ctypes.c_void_p]
        library.cudaFree.argtypes = [ctypes.c_void_p]
        for name in ("cudaMalloc", "cudaIpcGetMemHandle", "cudaFree"):
            getattr(library, name).restype = ctypes.c_int

    def create_shared_memory_region(self, name: str, byte_size: int, device_id: int) -> dict:
        pointer, handle = ctypes.c_void_p(), self.handle_type()
        self.runtime.call("cudaSetDevice", device_id)
        self.runtime.call("cudaMalloc", ctypes.byref(pointer), byte_size)
        self.runtime.call("cudaIpcGetMemHandle", ctypes.byref(handle), pointer)
        return {"name": name, "pointer": pointer.value, "handle": bytes(handle), "size": byte_size, "device": device_id}

    def get_raw_handle(self, region: dict) -> bytes:
        return base64.b64encode(region["handle"])  # as tritonclient's helper gives it, and its clients take it

    def set_shared_memory_region(self, region: dict, arrays: list) -> None:
        data = b"".join(np.ascontiguousarray(array).tobytes() for array in arrays)
        self.runtime.to_device(region["device"], region["pointer"], memoryview(data))

    def get_contents_as_numpy(self, region: dict, datatype, shape: list) -> np.ndarray:
        size = int(np.prod(shape)) * np.dtype(datatype).itemsize
        return np.frombuffer(self.runtime.to_host(region["device"], region["pointer"], size), datatype).reshape(shape)

    def destroy_shared_memory_region(self, region: dict) -> None:
        self.runtime.call("cudaSetDevice", region["device"])
        self.runtime.call("cudaFree", region["pointer"])


def client_memory():
    """tritonclient's helper where cuda-python lets it import, else the ctypes one."""
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm  # RuntimeError without cuda-python

        return cudashm
    except Exception:
        return CtypesMemory()


def check(protocol: str, url: str, memory, device_id: int = 0) -> str:
    """One round trip over `protocol` ("grpc" or "http"): "ok", or what went wrong."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(url=url)
    names = [f"cudashm-{protocol}-{os.getpid()}-{part}" for part in ("input0", "input1", "output0", "output1")]
    regions = []
    try:
        for name in names:
            regions.append(memory.create_shared_memory_region(name, BYTES, device_id))
        input0 = np.arange(16, dtype=np.int32).reshape(SHAPE)
        input1 = np.full(SHAPE, 3, dtype=np.int32)
        memory.set_shared_memory_region(regions[0], [input0])
        memory.set_shared_memory_region(regions[1], [input1])
        for name, region in zip(names, regions):
            client.register_cuda_shared_memory(name, memory.get_raw_handle(region), device_id, BYTES)
        listed = _listed(client.get_cuda_shared_memory_status())
        if not set(names) <= listed:
            return f"status lists {sorted(listed)}, not all of {names}"
        inputs = [client_module.InferInput(n, SHAPE, "INT32") for n in ("INPUT0", "INPUT1")]
        outputs = [client_module.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
        for tensor, name in zip([*inputs, *outputs], names):
            tensor.set_shared_memory(name, BYTES)
        client.infer(MODEL, inputs, outputs=outputs)
        total = memory.get_contents_as_numpy(regions[2], np.int32, SHAPE)
        difference = memory.get_contents_as_numpy(regions[3], np.int32, SHAPE)
        if not (np.array_equal(total, input0 + input1) and np.array_equal(difference, input0 - input1)):
            return f"wrong outputs: OUTPUT0 {total.tolist()}, OUTPUT1 {difference.tolist()}"
        for name in names:
            client.unregister_cuda_shared_memory(name)
        if left := set(names) & _listed(client.get_cuda_shared_memory_status()):
            return f"still listed after unregistering: {sorted(left)}"
        return "ok"
    except Exception as err:  # the server's refusal or a CUDA call's failure: the check's result
        return f"{type(err).__name__}: {err}"
    finally:  # cleanup that must not hide the check's own result
        for name in names[: len(regions)]:
            with contextlib.suppress(Exception):
                client.unregister_cuda_shared_memory(name)
        for region in regions:
            with contextlib.suppress(Exception):
                memory.destroy_shared_memory_region(region)
        with contextlib.suppress(Exception):
            client.close()


def _listed(status) -> set[str]:
    """Region names from a status answer: a protobuf message over gRPC, a list of dicts over REST."""
    if isinstance(status, list):
        return {region["name"] for region in status}
    return set(status.regions)


def run(server_url_grpc: str, server_url_http: str, device_id: int = 0) -> dict:
    """{"grpc": "ok" or what went wrong, "http": likewise}; never raises for a missing GPU or client."""
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as err:
        reason = f"tritonclient is not installed: {err}"
        return {"grpc": reason, "http": reason}
    try:
        memory = client_memory()
    except Exception as err:  # CudaError: no libcudart or no device on this machine
        reason = f"the client cannot use CUDA: {err}"
        return {"grpc": reason, "http": reason}
    return {
        "grpc": check("grpc", server_url_grpc, memory, device_id),
        "http": check("http", server_url_http, memory, device_id),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", default="localhost:8001", help="the server's gRPC address (host:port)")
    parser.add_argument("--http", default="localhost:8000", help="the server's REST address (host:port)")
    parser.add_argument("--device", type=int, default=0, help="the GPU the regions are allocated on")
    args = parser.parse_args()
    result = run(args.grpc, args.http, args.device)
    print(json.dumps(result, indent=2))
    return 0 if all(value == "ok" for value in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
