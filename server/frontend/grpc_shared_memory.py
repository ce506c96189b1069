"""Triton's shared memory RPCs over gRPC: system and CUDA shared memory registered, listed and
unregistered (server/frontend/shared_regions.py holds the regions, cuda_regions.py the CUDA ones)."""

from server import protocol
from server.frontend.grpc_infer import GrpcInference
from server.frontend.shared_regions import SharedRegions


class SharedMemoryRpcs:
    def __init__(self, regions: SharedRegions, inference: GrpcInference) -> None:
        self.regions, self.inference = regions, inference

    def implementations(self) -> dict:
        return {
            "SystemSharedMemoryStatus": self.SystemSharedMemoryStatus,
            "SystemSharedMemoryRegister": self.SystemSharedMemoryRegister,
            "SystemSharedMemoryUnregister": self.SystemSharedMemoryUnregister,
            "CudaSharedMemoryStatus": self.CudaSharedMemoryStatus,
            "CudaSharedMemoryRegister": self.CudaSharedMemoryRegister,
            "CudaSharedMemoryUnregister": self.CudaSharedMemoryUnregister,
        }

    def _tenant(self, context) -> str:
        return self.inference.identity(context).tenant

    async def SystemSharedMemoryStatus(self, request, context):
        listed = await self.regions.status(request.name, self._tenant(context))
        return _status("SystemSharedMemoryStatus", listed, ("key", "offset", "byte_size"))

    async def SystemSharedMemoryRegister(self, request, context):
        await self.regions.register(request.name, request.key, request.offset, request.byte_size, self._tenant(context))
        return protocol.response_class("SystemSharedMemoryRegister")()

    async def SystemSharedMemoryUnregister(self, request, context):
        await self.regions.unregister(request.name, self._tenant(context))
        return protocol.response_class("SystemSharedMemoryUnregister")()

    async def CudaSharedMemoryStatus(self, request, context):
        listed = await self.regions.status_cuda(request.name, self._tenant(context))
        return _status("CudaSharedMemoryStatus", listed, ("device_id", "byte_size"))

    async def CudaSharedMemoryRegister(self, request, context):
        tenant = self._tenant(context)
        await self.regions.register_cuda(request.name, request.raw_handle, request.device_id, request.byte_size, tenant)
        return protocol.response_class("CudaSharedMemoryRegister")()

    async def CudaSharedMemoryUnregister(self, request, context):
        await self.regions.unregister_cuda(request.name, self._tenant(context))
        return protocol.response_class("CudaSharedMemoryUnregister")()


def _status(method: str, regions, fields: tuple[str, ...]):
    """A Status RPC's answer: each region by name, with its name and `fields`."""
    response = protocol.response_class(method)()
    for region in regions:
        entry = response.regions[region.name]
        entry.name = region.name
        for name in fields:
            setattr(entry, name, getattr(region, name))
    return response
