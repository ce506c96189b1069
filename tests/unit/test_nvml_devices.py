"""Which NVML device each CUDA ordinal is, against a stand-in for NVML (no GPU driver runs here).

The stand-in's three boards are listed by NVML in an order that is not their PCI bus order, so a
reader that took NVML index N for cuda:N reads the wrong board and these tests fail."""

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from server.observe import nvml_devices
from server.observe.metrics import GpuReader
from server.observe.nvml_devices import cuda_devices, pin_cuda_order

PINNED = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
MIG_UUID = "MIG-5a1e0000-1111-2222-3333-444455556666"


@dataclass(eq=False)
class Board:
    name: str
    uuid: str
    bus_id: bytes | str  # pynvml gives bytes or str depending on its version
    millijoules: int
    mig_mode: int | None = None  # None: the GPU does not support MIG
    instances: dict = field(default_factory=dict)  # MIG UUID -> Instance


@dataclass(eq=False)
class Instance:
    name: str
    parent: Board
    memory_total: int


# NVML index order: B, C, A. PCI bus order (CUDA's, pinned): A (01), B (41), C (81).
BOARD_A = Board("NVIDIA H200", "GPU-aaaa1111-0000-0000-0000-000000000001", b"00000000:01:00.0", 1_000_000)
BOARD_B = Board(
    "NVIDIA A100-SXM4-80GB", "GPU-bbbb2222-0000-0000-0000-000000000002", "00000000:41:00.0", 2_000_000, mig_mode=1
)
BOARD_C = Board(
    "NVIDIA H100 80GB HBM3", "GPU-cccc3333-0000-0000-0000-000000000003", "00000000:81:00.0", 3_000_000, mig_mode=0
)
BOARD_B.instances[MIG_UUID] = Instance("NVIDIA A100-SXM4-80GB MIG 1g.10gb", BOARD_B, 10 * 2**30)


class StandInNvml:
    """The pynvml calls nvml_devices and GpuReader make, over three boards and one MIG instance."""

    class NVMLError(Exception):
        pass

    def __init__(self, boards=(BOARD_B, BOARD_C, BOARD_A), fails_init: bool = False) -> None:
        self.boards, self.fails_init = list(boards), fails_init
        self.initialised = 0  # nvmlInit calls not yet matched by nvmlShutdown

    def nvmlInit(self):
        if self.fails_init:
            raise self.NVMLError("Driver Not Loaded")
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        return len(self.boards)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.boards[index]

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=handle.bus_id)

    def nvmlDeviceGetUUID(self, handle):
        return handle.uuid

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for board in self.boards:
            if board.uuid == uuid:
                return board
            if uuid in board.instances:
                return board.instances[uuid]
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        if not isinstance(handle, Instance):
            raise self.NVMLError("Invalid Argument")
        return handle.parent

    def nvmlDeviceGetMigMode(self, handle):
        if handle.mig_mode is None:
            raise self.NVMLError("Not Supported")
        return handle.mig_mode, handle.mig_mode

    def nvmlDeviceGetName(self, handle):
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = handle.memory_total if isinstance(handle, Instance) else 80 * 2**30
        return SimpleNamespace(used=total // 4, total=total)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if isinstance(handle, Instance):  # as on a real GPU: energy is counted per board only
            raise self.NVMLError("Not Supported")
        return handle.millijoules

    def nvmlDeviceGetPowerUsage(self, handle):
        return handle.millijoules // 10_000

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=50, memory=10)


def devices(visible: str | None, **environ) -> list:
    environ = {**PINNED, **environ}
    if visible is not None:
        environ["CUDA_VISIBLE_DEVICES"] = visible
    return cuda_devices(StandInNvml(), environ)


def test_without_cuda_visible_devices_every_board_in_pci_order():
    found = devices(None)
    assert [d.name for d in found] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [d.handle for d in found] == [BOARD_A, BOARD_B, BOARD_C]  # NVML lists them B, C, A
    assert [d.uuid for d in found] == [BOARD_A.uuid, BOARD_B.uuid, BOARD_C.uuid]
    assert [d.mig for d in found] == [False, True, False]  # B is in MIG mode: CUDA runs on a slice of it
    assert found[0].note == "" and found[2].note == ""
    assert "whole board" in found[1].note


def test_integer_entries_index_the_pci_order_in_the_given_order():
    found = devices("2,0")
    assert [(d.name, d.handle) for d in found] == [("cuda:0", BOARD_C), ("cuda:1", BOARD_A)]


def test_a_unique_uuid_prefix_names_its_board():
    assert [d.handle for d in devices("GPU-cccc,1")] == [BOARD_C, BOARD_B]
    assert [d.handle for d in devices(BOARD_A.uuid)] == [BOARD_A]
    assert devices("GPU-") == []  # a prefix of every board names none: invalid


def test_a_mig_instance_reads_its_parent_board():
    (found,) = devices(MIG_UUID)
    assert (found.name, found.handle, found.uuid, found.mig) == ("cuda:0", BOARD_B, MIG_UUID, True)
    assert found.instance is BOARD_B.instances[MIG_UUID]
    assert "over-count" in found.note and BOARD_B.uuid in found.note


def test_the_legacy_mig_name_reads_its_parent_board():
    (found,) = devices(f"MIG-{BOARD_C.uuid}/1/0")
    assert (found.handle, found.mig, found.instance) == (BOARD_C, True, None)


@pytest.mark.parametrize(
    "visible, boards",
    [
        ("1,7,0", [BOARD_B]),  # 7: no such board
        ("0,x,2", [BOARD_A]),
        ("0,,2", [BOARD_A]),
        ("2,MIG-00000000-dead-beef-0000-000000000000,0", [BOARD_C]),  # no such MIG instance
        ("GPU-ffff,0", []),
        ("1,1,2", [BOARD_B]),  # a board listed twice is not metered as two devices
    ],
)
def test_an_invalid_entry_hides_itself_and_every_entry_after_it(visible, boards):
    assert [d.handle for d in devices(visible)] == boards


@pytest.mark.parametrize("visible", ["", " ", "-1", "NoDevFiles", "-1,0"])
def test_empty_or_minus_one_means_no_gpu(visible):
    assert devices(visible) == []


def test_pin_cuda_order_sets_pci_bus_id_when_unset():
    environ = {}
    assert pin_cuda_order(environ) is None
    assert environ == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    pinned = dict(PINNED)
    assert pin_cuda_order(pinned) is None and pinned == PINNED


def test_pin_cuda_order_warns_on_another_order_and_keeps_it():
    environ = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    warning = pin_cuda_order(environ)
    assert warning and "FASTEST_FIRST" in warning and "UUID" in warning
    assert environ == {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}  # the user's choice stands


def test_an_order_other_than_pci_is_noted_on_boards_chosen_by_index():
    by_index, by_uuid = devices("0,GPU-cccc", CUDA_DEVICE_ORDER="FASTEST_FIRST")
    assert "FASTEST_FIRST" in by_index.note
    assert by_uuid.note == ""  # a UUID names the same board in any order
    (unpinned,) = cuda_devices(StandInNvml(), {"CUDA_VISIBLE_DEVICES": "0"})
    assert "CUDA_DEVICE_ORDER unset" in unpinned.note


def test_gpu_reader_reads_the_board_cuda_numbers_0():
    nvml = StandInNvml()
    reader = GpuReader.open(nvml, {**PINNED, "CUDA_VISIBLE_DEVICES": "2"})
    assert reader.handles == {"cuda:0": BOARD_C}  # NVML index 0 is board B
    assert reader.energy_meter("cuda:0")() == 3000.0
    assert reader.readings("cuda:0")["energy"] == 3000.0
    assert reader.names() == {"cuda:0": "NVIDIA H100 80GB HBM3"}
    reader.close()
    assert nvml.initialised == 0


def test_gpu_reader_on_a_mig_instance_logs_that_energy_is_the_boards(caplog):
    with caplog.at_level(logging.INFO, logger="server.observe.metrics"):
        reader = GpuReader.open(StandInNvml(), {**PINNED, "CUDA_VISIBLE_DEVICES": MIG_UUID})
    values = reader.readings("cuda:0")
    assert values["energy"] == 2000.0  # the parent board's counter
    assert values["memory_total"] == 10 * 2**30  # the instance's own memory, not the board's 80 GiB
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "over-count" in warnings[0]


def test_gpu_reader_without_nvml_or_without_a_visible_gpu_is_none(caplog):
    with caplog.at_level(logging.INFO, logger="server.observe.metrics"):
        assert GpuReader.open(StandInNvml(fails_init=True), PINNED) is None
        nvml = StandInNvml()
        assert GpuReader.open(nvml, {**PINNED, "CUDA_VISIBLE_DEVICES": ""}) is None
    assert nvml.initialised == 0  # shut down again
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "NVML is not available" in messages and "CUDA sees no GPU" in messages


def test_count_follows_cuda_visible_devices():
    nvml = StandInNvml()
    assert nvml_devices.count(nvml, {**PINNED, "CUDA_VISIBLE_DEVICES": "0,2"}) == 2
    assert nvml_devices.count(nvml, PINNED) == 3
    assert nvml.initialised == 0
    assert nvml_devices.count(StandInNvml(fails_init=True), PINNED) == 0


def test_a_failing_driver_counts_no_gpu_and_is_shut_down():
    class LostGpu(StandInNvml):
        def nvmlDeviceGetPciInfo(self, handle):
            raise self.NVMLError("GPU is lost")

    nvml = LostGpu()
    assert nvml_devices.count(nvml, PINNED) == 0
    assert nvml_devices.read("cuda:0", nvml, PINNED) is None
    assert nvml.initialised == 0


def test_gpu_names_in_cuda_order_a_mig_instance_by_its_own_name():
    names = nvml_devices.gpu_names(StandInNvml(), {**PINNED, "CUDA_VISIBLE_DEVICES": f"2,{MIG_UUID}"})
    assert names == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB MIG 1g.10gb"]
    assert nvml_devices.gpu_names(StandInNvml(fails_init=True), PINNED) == []


def test_read_one_cuda_device_for_scripts():
    nvml = StandInNvml()
    found = nvml_devices.read("cuda:1", nvml, {**PINNED, "CUDA_VISIBLE_DEVICES": f"0,{MIG_UUID}"})
    assert found["energy_joules"] == 2000.0 and found["mig"] is True
    assert found["memory_used"] == 10 * 2**30 // 4 and found["memory_total"] == 10 * 2**30
    assert found["uuid"] == MIG_UUID and "over-count" in found["note"]
    assert nvml_devices.read("cuda:0", nvml, PINNED)["energy_joules"] == 1000.0  # board A, NVML index 2
    assert nvml_devices.read("cuda:3", nvml, PINNED) is None
    assert nvml.initialised == 0
    assert nvml_devices.read("cuda:0", StandInNvml(fails_init=True), PINNED) is None
