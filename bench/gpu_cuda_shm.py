"""The GPU check's step `cuda_shm` (bench/gpu_check.py): Triton's CUDA shared memory against the
check's own server, as NVIDIA's simple_grpc_cudashm_client.py uses it, with no tritonclient (the GPU
machine has none). Device buffers are allocated and exported in this process (cudaMalloc,
cudaIpcGetMemHandle: bench/cuda_shm_check.CtypesMemory), registered with CudaSharedMemoryRegister,
named as the model's input and output in one ModelInfer, and the output read back from the device
must equal what the same input gives in the message. Then the regions are unregistered and the
status must be empty. Without a GPU (--cpu), the server must refuse the registration saying why,
and the step is skipped with that reason."""

import numpy as np

from bench.cuda_shm_check import CtypesMemory
from bench.gpu_steps import Context, Failed, Skip
from bench.grpc_client import Client
from server import protocol
from server.cuda_runtime import CudaError
from server.frontend.shared_regions import REGION, REGION_OFFSET, REGION_SIZE
from server.tensors import DATATYPES

DEVICE = 0


def cuda_shared_memory(ctx: Context) -> dict:
    model = ctx.plan.model
    url = ctx.serve().url
    with Client(url) as client:
        (input_name, input_type, input_shape), (output_name, output_type, output_shape) = _specs(client, model)
        x = np.random.default_rng(0).standard_normal(input_shape).astype(DATATYPES[input_type].numpy)
        plain = client.infer(model, {input_name: x})[output_name]
        try:
            memory = CtypesMemory()
        except CudaError as err:
            raise Skip(f"no GPU here ({err}); the server said: {_refusal(client)}") from None
        sizes = (x.nbytes, plain.nbytes)
        regions = [memory.create_shared_memory_region(f"check-{part}", size, DEVICE) for part, size in zip("io", sizes)]
        try:
            memory.set_shared_memory_region(regions[0], [x])
            for region in regions:
                client.call("CudaSharedMemoryRegister", _register(region))
            status = client.call("CudaSharedMemoryStatus", protocol.request_class("CudaSharedMemoryStatus")())
            client.call("ModelInfer", _request(model, x, input_name, output_name, sizes))
            placed = memory.get_contents_as_numpy(regions[1], plain.dtype, list(output_shape))
            client.call("CudaSharedMemoryUnregister", protocol.request_class("CudaSharedMemoryUnregister")())
            after = client.call("CudaSharedMemoryStatus", protocol.request_class("CudaSharedMemoryStatus")())
        finally:
            for region in regions:
                memory.destroy_shared_memory_region(region)
    found = {"model": model, "listed": sorted(status.regions), "listed_after": sorted(after.regions)}
    found["max_difference"] = float(np.max(np.abs(placed.astype(np.float64) - plain.astype(np.float64))))
    found["summary"] = (
        f"{model}: input {sizes[0]} B and output {sizes[1]} B in CUDA shared memory on device {DEVICE}; "
        f"output differs from the message's by at most {found['max_difference']:.2e}"
    )
    if set(found["listed"]) != {"check-i", "check-o"} or found["listed_after"]:
        raise Failed(f"status listed {found['listed']}, then {found['listed_after']}", found)
    if not np.allclose(placed, plain, rtol=1e-3, atol=1e-3):
        raise Failed("the output written into CUDA shared memory differs from the message's", found)
    return found


def _specs(client: Client, model: str) -> tuple[tuple, tuple]:
    """(name, datatype, one row's shape) of the model's first input and first output."""
    metadata = client.call("ModelMetadata", protocol.request_class("ModelMetadata")(name=model))

    def one_row(tensor) -> tuple:
        return tensor.name, tensor.datatype, tuple(1 if dim < 0 else dim for dim in tensor.shape)

    return one_row(metadata.inputs[0]), one_row(metadata.outputs[0])


def _register(region: dict):
    return protocol.request_class("CudaSharedMemoryRegister")(
        name=region["name"], raw_handle=region["handle"], device_id=region["device"], byte_size=region["size"]
    )


def _request(model: str, x: np.ndarray, input_name: str, output_name: str, sizes: tuple[int, int]):
    request = protocol.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=input_name, datatype=_wire(x.dtype), shape=list(x.shape))
    output = request.outputs.add(name=output_name)
    for parameters, region, size in (
        (tensor.parameters, "check-i", sizes[0]),
        (output.parameters, "check-o", sizes[1]),
    ):
        parameters[REGION].string_param = region
        parameters[REGION_SIZE].int64_param = size
        parameters[REGION_OFFSET].int64_param = 0
    return request


def _wire(dtype: np.dtype) -> str:
    return next(wire for wire, datatype in DATATYPES.items() if datatype.numpy == dtype)


def _refusal(client: Client) -> str:
    """What the server answers a registration where it sees no GPU: it must say why."""
    region = {"name": "check-refused", "handle": bytes(64), "device": DEVICE, "size": 64}
    try:
        client.call("CudaSharedMemoryRegister", _register(region))
    except Exception as err:  # noqa: BLE001 - the refusal is what this returns
        details = err.details() if hasattr(err, "details") else str(err)
        if "CUDA" not in details:
            raise Failed(f"the refusal does not say why: {details}", {}) from None
        return details
    raise Failed("the server registered a CUDA region on a machine without a GPU", {})
