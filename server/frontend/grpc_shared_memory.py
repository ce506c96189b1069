"""Triton's shared memory RPCs over gRPC: system shared memory registered, listed and unregistered
(server/frontend/shared_regions.py holds the regions); CUDA shared memory, which needs a GPU and
cudaIpc handles, lists nothing, unregisters nothing and refuses to register, saying why."""

from server import protocol
from server.errors import InvalidInput
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
        response = protocol.response_class("SystemSharedMemoryStatus")()
        for region in self.regions.status(request.name, self._tenant(context)):
            response.regions[region.name].name = region.name
            response.regions[region.name].key = region.key
            response.regions[region.name].offset = region.offset
            response.regions[region.name].byte_size = region.byte_size
        return response

    async def SystemSharedMemoryRegister(self, request, context):
        self.regions.register(request.name, request.key, request.offset, request.byte_size, self._tenant(context))
        return protocol.response_class("SystemSharedMemoryRegister")()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.regions.unregister(request.name, self._tenant(context))
        return protocol.response_class("SystemSharedMemoryUnregister")()

    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise InvalidInput(f"unable to find cuda shared memory region: '{request.name}'")
        return protocol.response_class("CudaSharedMemoryStatus")()

    async def CudaSharedMemoryRegister(self, request, context):
        raise InvalidInput(
            "CUDA shared memory is not served yet (it needs a GPU and cudaIpc handles): use system shared memory"
        )

    async def CudaSharedMemoryUnregister(self, request, context):
        return protocol.response_class("CudaSharedMemoryUnregister")()
