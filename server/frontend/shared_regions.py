"""Triton's system shared memory extension: regions of POSIX shared memory that a client on the
same node registers by name (its key, an offset and a size), then names in an inference request
instead of sending tensor bytes: inputs are read from the region and outputs written into it, and
the response carries no tensor bytes for them.

A region is mapped once, as it registers; a request reads and writes through views of that mapping,
so a region unregistered while a request uses it stays mapped until the request is done. Every
offset and size is checked against the region before anything is read or written. With API keys,
a region belongs to the tenant that registered it: other tenants neither see nor use it."""

import asyncio
import inspect
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.errors import InvalidInput, shown
from server.tensors import DATATYPES

SHARED_MEMORY = Path("/dev/shm")
REGION = "shared_memory_region"
REGION_SIZE = "shared_memory_byte_size"
REGION_OFFSET = "shared_memory_offset"
MAX_REGIONS = 4096  # registered at once: each holds a mapping and a file descriptor's worth of kernel state
MAX_FETCHES = 64  # regions one request may name that its front end has yet to map


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    tenant: str
    mapped: mmap.mmap

    def view(self, offset: int, size: int, what: str) -> memoryview:
        """`size` bytes at `offset` within the region; InvalidInput naming region, offset and size
        where they do not fit."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise InvalidInput(
                f"{what}: shared memory region '{shown(self.name)}' holds {self.byte_size} bytes; "
                f"offset {offset} + size {size} does not fit in it"
            )
        start = self.offset + offset
        return memoryview(self.mapped)[start : start + size]

    def write(self, offset: int, data, what: str) -> None:
        """`data` (any buffer) into the region at `offset`, bounds-checked as `view` is."""
        data = memoryview(data).cast("B") if memoryview(data).c_contiguous else memoryview(bytes(data))
        self.view(offset, len(data), what)[:] = data


class RegionMiss(InvalidInput):
    """A front end in a process of its own has not mapped a region a request names: it asks the engine
    (server/frontend/link_regions.py) and decodes the request again."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unable to find system shared memory region: '{shown(name)}'")
        self.name = name


class SharedRegions:
    """The registered regions, by name. The control calls are coroutines, as a front end's in a process
    of its own are (they ask the engine, which holds the registry for every front end)."""

    remote = False  # a region named is registered here or nowhere

    def __init__(self, directory: Path = SHARED_MEMORY, cuda=None) -> None:
        self.directory = directory
        self.regions: dict[str, Region] = {}
        self.cuda = cuda  # cuda_regions.CudaRegions: a request names either kind of region alike

    async def register(self, name: str, key: str, offset: int, byte_size: int, tenant: str) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        if name in self.regions or (self.cuda is not None and name in self.cuda.regions):
            raise InvalidInput(f"shared memory region '{shown(name)}' is registered already; unregister it first")
        if len(self.regions) >= MAX_REGIONS:
            raise InvalidInput(f"{MAX_REGIONS} shared memory regions are registered: unregister some first")
        self.regions[name] = map_region(self.directory, name, key, offset, byte_size, tenant)

    async def unregister(self, name: str, tenant: str) -> list[str]:
        """One region, or every region of the tenant when `name` is empty; an unknown name is no error.
        Returns the names unregistered."""
        names = [name] if name else [n for n, r in self.regions.items() if r.tenant == tenant]
        gone = []
        for each in names:
            region = self.regions.get(each)
            if region is not None and region.tenant == tenant:
                del self.regions[each]  # the mapping goes with the last view of it
                gone.append(each)
        return gone

    async def status(self, name: str, tenant: str) -> list[Region]:
        if not name:
            return [region for region in self.regions.values() if region.tenant == tenant]
        return [self.get(name, tenant)]

    async def fetch(self, name: str, tenant: str) -> None:
        raise InvalidInput(f"unable to find system shared memory region: '{shown(name)}'")

    def get(self, name: str, tenant: str) -> Region:
        region = self.regions.get(name)
        if region is None and self.cuda is not None and name in self.cuda.regions:
            return self.cuda.get(name, tenant)
        if region is None or region.tenant != tenant:
            raise InvalidInput(f"unable to find system shared memory region: '{shown(name)}'")
        return region

    # CUDA regions: their calls block (the first one starts CUDA), so they run in a thread

    async def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int, tenant: str) -> None:
        if name in self.regions:
            raise InvalidInput(f"shared memory region '{shown(name)}' is registered already; unregister it first")
        await asyncio.to_thread(self.cuda.register, name, raw_handle, device_id, byte_size, tenant)

    async def unregister_cuda(self, name: str, tenant: str) -> list[str]:
        before = set(self.cuda.regions)
        await asyncio.to_thread(self.cuda.unregister, name, tenant)
        return sorted(before - set(self.cuda.regions))

    async def status_cuda(self, name: str, tenant: str) -> list:
        return self.cuda.status(name, tenant)


def map_region(directory: Path, name: str, key: str, offset: int, byte_size: int, tenant: str) -> Region:
    """The region mapped, once its key opens and offset + byte_size fit in it."""
    try:
        fd = os.open(_path(directory, key), os.O_RDWR)
    except OSError as err:
        raise InvalidInput(
            f"unable to open shared memory region '{shown(name)}' key '{shown(key)}': {err.strerror}"
        ) from None
    try:
        file_size = os.fstat(fd).st_size
        if offset < 0 or byte_size <= 0 or offset + byte_size > file_size:
            raise InvalidInput(
                f"shared memory region '{shown(name)}': offset {offset} + byte_size {byte_size} does not fit "
                f"in key '{shown(key)}' of {file_size} bytes"
            )
        mapped = mmap.mmap(fd, file_size)
    finally:
        os.close(fd)
    return Region(name, key, offset, byte_size, tenant, mapped)


def _path(directory: Path, key: str) -> Path:
    """POSIX shm_open's names: one leading slash, no other."""
    stripped = key[1:] if key.startswith("/") else key
    if not stripped or "/" in stripped or stripped in (".", ".."):
        raise InvalidInput(f"shared memory key '{shown(key)}' is not a POSIX shared memory name")
    return directory / stripped


async def with_regions(regions, tenant: str, step, *args):
    """`step(*args)`, a step that reads the caller's regions; a front end in a process of its own maps
    each region the first time a request names it (RegionMiss), then runs the step again."""
    for _ in range(MAX_FETCHES):
        try:
            result = step(*args)
            return await result if inspect.isawaitable(result) else result
        except RegionMiss as miss:
            await regions.fetch(miss.name, tenant)
    raise InvalidInput(f"a request names more than {MAX_FETCHES} shared memory regions")


def names_regions(tensors) -> bool:
    """Whether any of a message's input or output tensors names a shared memory region."""
    return any(REGION in tensor.parameters for tensor in tensors)


def region_of(parameters, what: str) -> tuple[str, int, int] | None:
    """(region, offset, size) a tensor's parameters name, or None."""
    if REGION not in parameters:
        return None
    name = parameters[REGION].string_param
    if REGION_SIZE not in parameters:
        raise InvalidInput(f"{what}: names shared memory region '{shown(name)}' without {REGION_SIZE}")
    offset = parameters[REGION_OFFSET].int64_param if REGION_OFFSET in parameters else 0
    return name, offset, parameters[REGION_SIZE].int64_param


def write_output(region: Region, offset: int, size: int, data: bytes | memoryview, what: str) -> None:
    """The output's bytes into its region (system or CUDA); InvalidInput when they do not fit the size given."""
    if len(data) > size:
        raise InvalidInput(
            f"{what}: {len(data)} bytes do not fit shared memory region '{shown(region.name)}' "
            f"(shared_memory_byte_size {size})"
        )
    region.write(offset, data, what)


@dataclass(frozen=True)
class TenantRegions:
    """One tenant's regions: what a REST request may name."""

    regions: SharedRegions
    tenant: str

    def get(self, name: str) -> Region:
        return self.regions.get(name, self.tenant)

    def view(self, name: str, offset: int, size: int, what: str) -> memoryview:
        return self.get(name).view(offset, size, what)


@dataclass(frozen=True)
class PlacedOutput:
    """An output written into a region: the response names it, with no bytes."""

    shape: tuple
    region: str
    offset: int
    size: int


def inputs_from_regions(message, raw, regions: SharedRegions, tenant: str, label: str):
    """The request's raw contents, one per input in order, with the inputs that name a region read
    from it (views, no copy); `raw` as it was when none does. Raw contents stand for the other
    inputs, in order, as tritonclient sends them."""
    inputs = message.inputs
    if not names_regions(inputs):
        return raw
    given, aligned, used = list(message.raw_input_contents if raw is None else raw), [], 0
    for tensor in inputs:
        what = f"{label}: input '{shown(tensor.name)}'"
        where = region_of(tensor.parameters, what)
        if where is None:
            if used >= len(given):
                raise InvalidInput(f"{what}: has neither raw contents nor a shared memory region")
            aligned.append(given[used])
            used += 1
            continue
        name, offset, size = where
        _check_size(tensor, size, f"{what} in shared memory region '{shown(name)}' at offset {offset}")
        aligned.append(regions.get(name, tenant).view(offset, size, what))
    if used != len(given):
        raise InvalidInput(f"{label}: {len(given)} raw_input_contents for {used} inputs not in shared memory")
    return aligned


def _check_size(tensor, size: int, what: str) -> None:
    datatype = DATATYPES.get(tensor.datatype)
    if datatype is None or datatype.numpy is None:
        return  # BYTES, or a datatype the decoder names
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * datatype.numpy.itemsize
    if size != expected:
        raise InvalidInput(
            f"{what}: shared_memory_byte_size {size}; shape {list(tensor.shape)} of {tensor.datatype} needs {expected}"
        )
