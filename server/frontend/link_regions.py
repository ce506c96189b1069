"""Triton's system and CUDA shared memory with front ends in processes of their own (--frontends N > 1).

The engine holds the one registry (a SharedRegions in its process), so that a region registered
through one front end is there for a request arriving at any other. A front end maps a region (or
opens a CUDA region's IPC handle) the first time one of its requests names it, asking the engine
what is registered under that name, and keeps it until the engine says the region is gone: the
engine tells every front end of an unregistration and waits for each to have forgotten it before
the caller is answered, so no request read after that uses it. Reads and writes go through the
front end's own mapping, as in one process."""

import asyncio
import base64
import logging
from dataclasses import dataclass
from pathlib import Path

from server.frontend.cuda_regions import CudaRegions
from server.frontend.shared_regions import SHARED_MEMORY, Region, RegionMiss, map_region

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaStatus:
    name: str
    device_id: int
    byte_size: int


class RemoteRegions:
    """SharedRegions' interface, for a front end: the registry is the engine's, the mappings its own."""

    remote = True

    def __init__(self, connection, directory: Path = SHARED_MEMORY) -> None:
        self.link, self.directory = connection, directory
        self.mapped: dict[str, Region] = {}
        self.cuda = CudaRegions()  # the CUDA regions this front end opened
        connection.on_regions_gone = self.forget

    async def register(self, name: str, key: str, offset: int, byte_size: int, tenant: str) -> None:
        await self.link.call("region_register", name, key, offset, byte_size, tenant)

    async def unregister(self, name: str, tenant: str) -> None:
        await self.link.call("region_unregister", name, tenant)

    async def status(self, name: str, tenant: str) -> list[Region]:
        rows, _ = await self.link.call("region_status", name, tenant)
        return [Region(row_name, key, offset, size, tenant, None) for row_name, key, offset, size in rows]

    async def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int, tenant: str) -> None:
        handle = base64.b64encode(raw_handle).decode()
        await self.link.call("region_register_cuda", name, handle, device_id, byte_size, tenant)

    async def unregister_cuda(self, name: str, tenant: str) -> None:
        await self.link.call("region_unregister_cuda", name, tenant)

    async def status_cuda(self, name: str, tenant: str) -> list[CudaStatus]:
        rows, _ = await self.link.call("region_status_cuda", name, tenant)
        return [CudaStatus(*row) for row in rows]

    async def fetch(self, name: str, tenant: str) -> None:
        """Map the region as the engine has it registered; InvalidInput as in one process if it has not."""
        kind, *where = (await self.link.call("region_get", name, tenant))[0]
        self.forget([name])  # what this front end held under the name is not what is registered now
        if kind == "cuda":
            handle, device_id, byte_size = where
            raw = base64.b64decode(handle)
            await asyncio.to_thread(self.cuda.register, name, raw, device_id, byte_size, tenant)
            return
        key, offset, byte_size = where
        self.mapped[name] = map_region(self.directory, name, key, offset, byte_size, tenant)

    def get(self, name: str, tenant: str):
        region = self.mapped.get(name) or self.cuda.regions.get(name)
        if region is None or region.tenant != tenant:
            raise RegionMiss(name)
        return region

    def forget(self, names: list[str]) -> None:
        for name in names:
            self.mapped.pop(name, None)  # the mapping goes with the last request's view of it
            if (cuda := self.cuda.regions.get(name)) is not None:
                self.cuda.unregister(name, cuda.tenant)  # closed once no copy uses it
