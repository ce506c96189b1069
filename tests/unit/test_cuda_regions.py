"""CUDA shared memory regions (server/frontend/cuda_regions.py). Without a GPU here, the real runtime
is checked for its refusal; bounds, bookkeeping, tenancy and errors run against a runtime whose
"device memory" is host bytearrays, keyed by the handles it hands out, with the interface of
CudaRuntime; CudaRuntime's own plumbing runs against a library whose cudaMemcpy is memmove."""

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from server import cuda_runtime
from server.cuda_runtime import CudaError, CudaRuntime
from server.errors import InvalidInput
from server.frontend import cuda_regions
from server.frontend.cuda_regions import CudaRegions

BASE = 0x10000  # the fake's pointers: allocation n opens at n * BASE


class FakeRuntime:
    """CudaRuntime's six calls over host memory; records what it opened and closed."""

    def __init__(self, devices: int = 1) -> None:
        self.devices, self.memory, self.opened, self.closed = devices, {}, {}, []
        self.fail_copies = False

    def allocate(self, size: int) -> bytes:
        handle = f"handle-{len(self.memory)}".encode().ljust(cuda_runtime.HANDLE_SIZE, b"\0")
        self.memory[handle] = bytearray(size)
        return handle

    def device_count(self) -> int:
        return self.devices

    def open(self, device_id: int, handle: bytes) -> int:
        if handle not in self.memory:
            raise CudaError("cudaIpcOpenMemHandle: invalid argument (cudaError 1)")
        pointer = (len(self.opened) + len(self.closed) + 1) * BASE
        self.opened[pointer] = handle
        return pointer

    def allocation_size(self, device_id: int, pointer: int) -> int:
        return len(self.memory[self.opened[pointer]])

    def close(self, device_id: int, pointer: int) -> None:
        del self.opened[pointer]
        self.closed.append(pointer)

    def _at(self, pointer: int) -> tuple[bytearray, int]:
        base = pointer - pointer % BASE
        return self.memory[self.opened[base]], pointer - base

    def to_host(self, device_id: int, pointer: int, size: int) -> bytearray:
        if self.fail_copies:
            raise CudaError("cudaMemcpy: an illegal memory access was encountered (cudaError 700)")
        memory, start = self._at(pointer)
        return bytearray(memory[start : start + size])

    def to_device(self, device_id: int, pointer: int, data: memoryview) -> None:
        memory, start = self._at(pointer)
        memory[start : start + len(data)] = data


@pytest.fixture
def fake():
    return FakeRuntime()


@pytest.fixture
def regions(fake):
    return CudaRegions(runtime_loader=lambda: fake)


def message(raised) -> str:
    return str(raised.value)


def test_the_real_runtime_refuses_here_saying_why_and_keeps_nothing():
    regions = CudaRegions()
    with pytest.raises(InvalidInput) as raised:
        regions.register("x", bytes(64), 0, 64, "")
    assert message(raised).startswith("unable to register CUDA shared memory region 'x': ")
    reasons = ("the CUDA runtime (libcudart) is not installed", "no CUDA device is visible", "cudaIpcOpenMemHandle")
    assert any(reason in message(raised) for reason in reasons), message(raised)
    assert regions.status("", "") == [] and regions.regions == {} and regions.pending == set()


def test_importing_and_making_the_registry_loads_no_cuda_library():
    probe = (
        "from server.frontend.cuda_regions import CudaRegions; CudaRegions();"
        "print(any('libcudart' in line for line in open('/proc/self/maps')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_missing_libcudart_is_named(monkeypatch):
    monkeypatch.setattr(cuda_runtime, "_libcudart_candidates", lambda: ["libcudart-not-here.so.99"])
    with pytest.raises(InvalidInput) as raised:
        CudaRegions().register("x", bytes(64), 0, 64, "")
    assert "'x': the CUDA runtime (libcudart) is not installed: libcudart-not-here.so.99" in message(raised)


def test_the_runtime_loads_at_the_first_register_once_and_again_after_a_failure(fake):
    calls = []

    def loader():
        calls.append(1)
        if len(calls) == 1:
            raise CudaError("the CUDA runtime (libcudart) is not installed: nowhere")
        return fake

    regions = CudaRegions(runtime_loader=loader)
    assert calls == []
    with pytest.raises(InvalidInput, match="not installed: nowhere"):
        regions.register("a", fake.allocate(16), 0, 16, "")
    regions.register("a", fake.allocate(16), 0, 16, "")
    regions.register("b", fake.allocate(16), 0, 16, "")
    assert len(calls) == 2


def test_what_is_written_reads_back_at_its_offset(regions, fake):
    regions.register("r", fake.allocate(64), 0, 64, "t")
    region = regions.get("r", "t")
    region.write(8, b"abcd", "input 'A'")
    region.write(16, np.arange(4, dtype=np.int32), "input 'B'")
    region.write(32, np.arange(8, dtype=np.int32)[::2], "strided")  # not contiguous: copied first
    assert bytes(region.view(8, 4, "x")) == b"abcd"
    np.testing.assert_array_equal(np.frombuffer(region.view(16, 16, "x"), np.int32), np.arange(4))
    np.testing.assert_array_equal(np.frombuffer(region.view(32, 16, "x"), np.int32), [0, 2, 4, 6])
    assert bytes(region.view(0, 0, "x")) == b""
    assert (region.name, region.device_id, region.byte_size, region.tenant) == ("r", 0, 64, "t")


@pytest.mark.parametrize("offset,size", [(60, 8), (-1, 4), (0, 65), (64, 1), (0, -1)])
def test_a_view_that_does_not_fit_names_region_offset_and_size(regions, fake, offset, size):
    regions.register("r", fake.allocate(64), 0, 64, "")
    with pytest.raises(InvalidInput) as raised:
        regions.get("r", "").view(offset, size, "input 'A'")
    assert message(raised) == (
        f"input 'A': CUDA shared memory region 'r' holds 64 bytes; offset {offset} + size {size} does not fit in it"
    )


def test_a_write_that_does_not_fit_changes_nothing(regions, fake):
    handle = fake.allocate(64)
    regions.register("r", handle, 0, 32, "")
    with pytest.raises(InvalidInput, match=r"'r' holds 32 bytes; offset 30 \+ size 4 does not fit"):
        regions.get("r", "").write(30, b"\xff" * 4, "output 'Y'")
    assert fake.memory[handle] == bytearray(64)


def test_a_failed_copy_names_region_and_reason(regions, fake):
    regions.register("r", fake.allocate(16), 0, 16, "")
    fake.fail_copies = True
    with pytest.raises(InvalidInput) as raised:
        regions.get("r", "").view(0, 4, "input 'A'")
    assert (
        message(raised)
        == "input 'A': CUDA shared memory region 'r': cudaMemcpy: an illegal memory access was encountered (cudaError 700)"
    )


def test_another_tenant_can_neither_get_list_nor_unregister_a_region(regions, fake):
    regions.register("r", fake.allocate(16), 0, 16, "alice")
    with pytest.raises(InvalidInput, match=r"^unable to find cuda shared memory region: 'r'$"):
        regions.get("r", "bob")
    with pytest.raises(InvalidInput, match="unable to find cuda shared memory region: 'r'"):
        regions.status("r", "bob")
    assert regions.status("", "bob") == []
    regions.unregister("r", "bob")
    regions.unregister("", "bob")
    assert [region.name for region in regions.status("", "alice")] == ["r"]
    assert fake.closed == []


def test_unregistering_every_region_of_a_tenant_closes_only_theirs(regions, fake):
    for name, tenant in (("a1", "alice"), ("a2", "alice"), ("b1", "bob")):
        regions.register(name, fake.allocate(16), 0, 16, tenant)
    regions.unregister("", "alice")
    assert regions.status("", "alice") == []
    assert [region.name for region in regions.status("", "bob")] == ["b1"]
    assert len(fake.closed) == 2 and len(fake.opened) == 1
    regions.unregister("nobody-registered-this", "bob")  # no error, as for system shared memory


def test_close_closes_every_handle(regions, fake):
    for name in ("a", "b", "c"):
        regions.register(name, fake.allocate(16), 0, 16, name)
    regions.close()
    assert fake.opened == {} and len(fake.closed) == 3
    assert all(regions.status("", tenant) == [] for tenant in "abc")


def test_a_region_held_stays_open_through_its_unregister_then_refuses(regions, fake):
    regions.register("r", fake.allocate(16), 0, 16, "")
    region = regions.get("r", "")
    with region.held():
        regions.unregister("r", "")
        assert fake.closed == [], "a request still uses it"
    assert len(fake.closed) == 1
    with pytest.raises(InvalidInput, match="CUDA shared memory region 'r' was unregistered"):
        region.view(0, 4, "output 'Y'")


def test_a_name_registered_twice_is_refused_and_the_first_kept(regions, fake):
    regions.register("r", fake.allocate(16), 0, 16, "")
    with pytest.raises(InvalidInput, match="CUDA shared memory region 'r' is registered already"):
        regions.register("r", fake.allocate(32), 0, 32, "")
    assert regions.get("r", "").byte_size == 16 and len(fake.opened) == 1


@pytest.mark.parametrize(
    "name,handle_size,device_id,byte_size,expected",
    [
        ("", 64, 0, 16, "a CUDA shared memory region needs a name"),
        ("r", 63, 0, 16, "'r': raw_handle is 63 bytes; a cudaIpcMemHandle_t is 64"),
        ("r", 88, 0, 16, "'r': raw_handle is 88 bytes"),  # base64 of 64 bytes, sent over gRPC undecoded
        ("r", 64, 0, 0, "'r': byte_size 0 is not positive"),
        ("r", 64, 0, -5, "'r': byte_size -5 is not positive"),
        ("r", 64, -1, 16, "'r': device_id -1 is not a device"),
        ("r", 64, 1, 16, "'r': device_id 1 is not one of the 1 devices the server sees"),
        ("r", 64, 0, 17, "'r': byte_size 17 is more than the 16 bytes of the handle's allocation"),
    ],
)
def test_a_bad_request_is_refused_naming_field_and_value(
    regions, fake, name, handle_size, device_id, byte_size, expected
):
    handle = fake.allocate(16)[:handle_size].ljust(handle_size, b"\0")
    with pytest.raises(InvalidInput) as raised:
        regions.register(name, handle, device_id, byte_size, "")
    assert expected in message(raised)
    assert regions.regions == {} and regions.pending == set() and fake.opened == {}


def test_a_handle_cuda_cannot_open_is_refused_with_cudas_reason(regions, fake):
    with pytest.raises(InvalidInput) as raised:
        regions.register("r", b"\x01" * 64, 0, 16, "")
    assert message(raised) == (
        "unable to register CUDA shared memory region 'r': cudaIpcOpenMemHandle: invalid argument (cudaError 1)"
    )


class NoDevice(FakeRuntime):
    def device_count(self) -> int:
        raise CudaError("cudaGetDeviceCount: no CUDA-capable device is detected (cudaError 100)")


def test_no_visible_device_is_said():
    runtime = NoDevice()
    with pytest.raises(InvalidInput) as raised:
        CudaRegions(runtime_loader=lambda: runtime).register("r", runtime.allocate(16), 0, 16, "")
    assert message(raised) == (
        "unable to register CUDA shared memory region 'r': no CUDA device is visible to the server "
        "(cudaGetDeviceCount: no CUDA-capable device is detected (cudaError 100))"
    )


def test_zero_devices_is_said():
    runtime = FakeRuntime(devices=0)
    with pytest.raises(InvalidInput) as raised:
        CudaRegions(runtime_loader=lambda: runtime).register("r", runtime.allocate(16), 0, 16, "")
    assert message(raised) == (
        "unable to register CUDA shared memory region 'r': no CUDA device is visible to the server "
        "(cudaGetDeviceCount: 0 devices)"
    )


def test_more_than_max_regions_are_refused(regions, fake, monkeypatch):
    monkeypatch.setattr(cuda_regions, "MAX_REGIONS", 2)
    regions.register("a", fake.allocate(16), 0, 16, "")
    regions.register("b", fake.allocate(16), 0, 16, "other")
    with pytest.raises(InvalidInput, match="2 CUDA shared memory regions are registered"):
        regions.register("c", fake.allocate(16), 0, 16, "")


class HostLibrary:
    """libcudart's calls as CudaRuntime makes them, over host memory: cudaMemcpy is memmove, and an
    opened handle points at a host buffer. Records each call."""

    def __init__(self, buffer: ctypes.Array) -> None:
        self.buffer, self.calls = buffer, []
        for name in ("cudaGetDeviceCount", "cudaSetDevice", "cudaIpcOpenMemHandle", "cudaIpcCloseMemHandle"):
            setattr(self, name, self._recorded(name))
        self.cudaMemcpy, self.cudaStreamSynchronize = (
            self._recorded("cudaMemcpy"),
            self._recorded("cudaStreamSynchronize"),
        )
        self.cudaGetErrorString = lambda status: b"invalid device ordinal"

    def _recorded(self, name):
        def call(*args):
            self.calls.append((name, *args))
            if name == "cudaSetDevice" and args[0] == 7:
                return 101
            if name == "cudaIpcOpenMemHandle":
                args[0].value = ctypes.addressof(self.buffer)
                assert bytes(args[1].reserved).startswith(b"handle") and args[2] == 1
            if name == "cudaMemcpy":
                ctypes.memmove(args[0], args[1], args[2])
            return 0

        return call


def test_cuda_runtime_copies_both_ways_on_the_regions_device_and_waits_for_the_copy_in():
    buffer = (ctypes.c_char * 32)()
    library = HostLibrary(buffer)
    runtime = CudaRuntime(library)
    pointer = runtime.open(3, b"handle".ljust(64, b"\0"))
    assert pointer == ctypes.addressof(buffer) and library.calls[0] == ("cudaSetDevice", 3)
    runtime.to_device(3, pointer + 4, memoryview(b"wxyz"))
    assert bytes(buffer)[4:8] == b"wxyz"
    assert [call[0] for call in library.calls[-3:]] == ["cudaSetDevice", "cudaMemcpy", "cudaStreamSynchronize"]
    assert library.calls[-2][3:] == (4, cuda_runtime.HOST_TO_DEVICE) == (4, 1)
    assert bytes(runtime.to_host(3, pointer + 4, 4)) == b"wxyz"
    assert library.calls[-1][3:] == (4, cuda_runtime.DEVICE_TO_HOST) == (4, 2)
    runtime.close(3, pointer)
    assert library.calls[-1] == ("cudaIpcCloseMemHandle", pointer)
    with pytest.raises(CudaError, match=r"^cudaSetDevice: invalid device ordinal \(cudaError 101\)$"):
        runtime.to_host(7, pointer, 4)
