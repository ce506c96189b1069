"""Which NVML device each CUDA ordinal is.

The server names devices "cuda:N", N being the CUDA ordinal onnxruntime's device_id takes. NVML
numbers GPUs its own way and ignores CUDA_VISIBLE_DEVICES, so NVML device N is not cuda:N in
general. CUDA, with CUDA_DEVICE_ORDER=PCI_BUS_ID (pin_cuda_order sets it at start), numbers the
physical GPUs by PCI bus id; CUDA_VISIBLE_DEVICES then picks and reorders them. cuda_devices
applies the same rules to NVML's devices, so "cuda:N" reads the board onnxruntime runs on.

Every function takes the pynvml module (or a stand-in) and the environment as arguments.
"""

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

ORDER_VARIABLE = "CUDA_DEVICE_ORDER"
VISIBLE_VARIABLE = "CUDA_VISIBLE_DEVICES"
PCI_ORDER = "PCI_BUS_ID"
NO_GPU_ENTRIES = ("-1", "NoDevFiles")  # what launchers write for "no GPU" (NoDevFiles: nvidia-container-runtime)
MIG_ENABLED = 1  # pynvml.NVML_DEVICE_MIG_ENABLE


class NvmlUnavailable(Exception):
    """No NVML library or no driver: a CPU machine."""


@dataclass(frozen=True, slots=True)
class NvmlDevice:
    name: str  # "cuda:N"
    handle: object  # the board's NVML handle: power and energy are counted per board only
    uuid: str  # as CUDA knows the device: "GPU-..." or, for a MIG instance, "MIG-..."
    mig: bool  # a MIG instance (or a board in MIG mode): the board's readings are shared
    note: str = ""  # why this device's readings may not be its own, for the start-up log
    instance: object | None = None  # a MIG instance's own handle: its memory is its own


@dataclass(frozen=True, slots=True)
class _Board:
    handle: object
    uuid: str
    bus_id: str


def pin_cuda_order(environ: MutableMapping[str, str]) -> str | None:
    """Make CUDA number GPUs by PCI bus id, as cuda_devices does. CUDA reads the variable once,
    when it initialises, so this must run before the first CUDA session. Returns a warning where
    the user chose another order (FASTEST_FIRST, CUDA's default): integer entries, or no
    CUDA_VISIBLE_DEVICES at all, may then name other boards than NVML's PCI order says."""
    order = environ.get(ORDER_VARIABLE, "")
    if not order:
        environ[ORDER_VARIABLE] = PCI_ORDER
        return None
    if order == PCI_ORDER:
        return None
    return (
        f"{ORDER_VARIABLE}={order}: CUDA may number the GPUs differently from their PCI bus order, so a cuda:N "
        f"device's GPU name, power, energy and default price may be another GPU's when GPUs are chosen by index; "
        f"unset {ORDER_VARIABLE} (the server then sets {PCI_ORDER}) or name GPUs by UUID in {VISIBLE_VARIABLE}"
    )


def start(nvml=None):
    """NVML, initialised (the caller shuts it down); pynvml unless a stand-in is given."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py: a dependency of the server; the driver may be absent
        except ImportError as err:
            raise NvmlUnavailable(str(err)) from err
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:  # no driver, no library file, no device node
        raise NvmlUnavailable(str(err)) from err
    return nvml


@contextlib.contextmanager
def session(nvml=None) -> Iterator:
    """NVML for one look: initialised, then shut down. Raises NvmlUnavailable, also where the
    driver is there but fails (a GPU fallen off the bus): then there is no GPU to count or read."""
    nvml = start(nvml)
    try:
        yield nvml
    except nvml.NVMLError as err:
        log.warning("NVML failed: %s", err)
        raise NvmlUnavailable(str(err)) from err
    finally:
        nvml.nvmlShutdown()


def cuda_devices(nvml, environ: Mapping[str, str]) -> list[NvmlDevice]:
    """The devices CUDA will number 0, 1, ..., in that order, each with the NVML handle to read."""
    boards = _physical_boards(nvml)
    visible = environ.get(VISIBLE_VARIABLE)
    if visible is None:
        entries = [str(index) for index in range(len(boards))]
    elif visible.strip() in ("", *NO_GPU_ENTRIES):
        return []
    else:
        entries = [entry.strip() for entry in visible.split(",")]
    order_note = _order_note(environ) if len(boards) > 1 else ""
    devices: list[NvmlDevice] = []
    for entry in entries:
        device = _resolve(nvml, boards, entry, f"cuda:{len(devices)}", order_note)
        if device is None or any(device.uuid == seen.uuid for seen in devices):
            # CUDA's rule: an invalid entry hides itself and every entry after it. A repeated
            # entry ends the list too: one board must not be metered as two devices.
            _warn_once(
                f"{VISIBLE_VARIABLE}={visible!r}: entry {entry!r} names no GPU NVML sees (or repeats one): "
                f"CUDA sees only the {len(devices)} device(s) before it"
            )
            break
        devices.append(device)
    return devices


def count(nvml=None, environ: Mapping[str, str] | None = None) -> int:
    """GPUs CUDA sees (CUDA_VISIBLE_DEVICES applied); 0 without NVML."""
    try:
        with session(nvml) as started:
            return len(cuda_devices(started, os.environ if environ is None else environ))
    except NvmlUnavailable as err:
        log.debug("NVML unavailable: %s", err)
        return 0


def gpu_names(nvml=None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The name of each GPU CUDA sees, in CUDA's order; a MIG instance by its own name
    ("... MIG 1g.10gb"). Empty without NVML."""
    try:
        with session(nvml) as started:
            devices = cuda_devices(started, os.environ if environ is None else environ)
            return [text(started.nvmlDeviceGetName(d.handle if d.instance is None else d.instance)) for d in devices]
    except NvmlUnavailable as err:
        log.debug("NVML unavailable: %s", err)
        return []


def read(device: str = "cuda:0", nvml=None, environ: Mapping[str, str] | None = None) -> dict | None:
    """One look at a CUDA device, for scripts: {"device", "name", "uuid", "mig", "memory_used"
    (bytes), "memory_total" (bytes), "energy_joules" (the board's counter since the driver loaded),
    "note" (why the readings may not be this device's alone; "" when they are)}; a reading the GPU
    does not support is None. None without NVML or where CUDA has no such device.
    For a MIG instance memory is the instance's own, energy the whole board's."""
    try:
        with session(nvml) as started:
            found = {d.name: d for d in cuda_devices(started, os.environ if environ is None else environ)}
            if device not in found:
                log.warning("%s: CUDA sees no such GPU (it sees %s)", device, ", ".join(found) or "none")
                return None
            return _reading(started, found[device])
    except NvmlUnavailable as err:
        log.debug("NVML unavailable: %s", err)
        return None


def _reading(nvml, device: NvmlDevice) -> dict:
    memory_handle = device.instance if device.instance is not None else device.handle

    def probe(call, handle):
        try:
            return call(handle)
        except nvml.NVMLError as err:  # this GPU does not support the reading: None, not 0
            log.debug("%s: reading not available: %s", device.name, err)
            return None

    memory = probe(nvml.nvmlDeviceGetMemoryInfo, memory_handle)
    millijoules = probe(nvml.nvmlDeviceGetTotalEnergyConsumption, device.handle)
    return {
        "device": device.name,
        "name": text(nvml.nvmlDeviceGetName(device.handle)),
        "uuid": device.uuid,
        "mig": device.mig,
        "memory_used": None if memory is None else float(memory.used),
        "memory_total": None if memory is None else float(memory.total),
        "energy_joules": None if millijoules is None else millijoules / 1000.0,
        "note": device.note,
    }


def _physical_boards(nvml) -> list[_Board]:
    """Every GPU NVML sees, in PCI bus order: the order CUDA numbers them in with PCI_BUS_ID."""
    boards = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        # NVML writes every bus id as fixed-width upper-case hex ("00000000:3B:00.0"), so text order is bus order
        bus_id = text(nvml.nvmlDeviceGetPciInfo(handle).busId).upper()
        boards.append(_Board(handle, text(nvml.nvmlDeviceGetUUID(handle)), bus_id))
    return sorted(boards, key=lambda board: board.bus_id)


def _resolve(nvml, boards: list[_Board], entry: str, name: str, order_note: str) -> NvmlDevice | None:
    """The device one CUDA_VISIBLE_DEVICES entry names, or None where CUDA finds it invalid."""
    if entry.isascii() and entry.isdigit():
        index = int(entry)
        return _board_device(nvml, boards[index], name, order_note) if index < len(boards) else None
    if entry.startswith("MIG-"):
        return _mig_device(nvml, boards, entry, name)
    if entry.startswith("GPU-"):
        matches = [board for board in boards if board.uuid.startswith(entry)]  # CUDA takes a unique prefix
        return _board_device(nvml, matches[0], name, "") if len(matches) == 1 else None
    return None


def _board_device(nvml, board: _Board, name: str, order_note: str) -> NvmlDevice:
    notes = [f"{name} is GPU {board.uuid} at PCI {board.bus_id} only if {order_note}"] if order_note else []
    mig = _mig_mode(nvml, board.handle)
    if mig:  # CUDA then runs on a MIG instance of this board, not on the whole board
        notes.append(_shared_board_note(name, f"a MIG instance on GPU {board.uuid}"))
    return NvmlDevice(name, board.handle, board.uuid, mig, "; ".join(notes))


def _mig_device(nvml, boards: list[_Board], entry: str, name: str) -> NvmlDevice | None:
    """A MIG instance, read through its parent board: NVML counts power and energy per board."""
    if entry.startswith("MIG-GPU-"):  # the pre-R470 form, MIG-<GPU UUID>/<GPU instance>/<compute instance>
        parent = [board for board in boards if board.uuid == entry[len("MIG-") :].split("/")[0]]
        if not parent:
            return None
        note = _shared_board_note(name, f"MIG instance {entry}")
        return NvmlDevice(name, parent[0].handle, entry, True, note)
    try:
        instance = nvml.nvmlDeviceGetHandleByUUID(entry)
        board = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(instance)
        board_uuid = text(nvml.nvmlDeviceGetUUID(board))
    except nvml.NVMLError as err:  # no such instance (destroyed, or a typo): CUDA finds it invalid too
        log.debug("%s=%s: %s", VISIBLE_VARIABLE, entry, err)
        return None
    note = _shared_board_note(name, f"MIG instance {entry} on GPU {board_uuid}")
    return NvmlDevice(name, board, entry, True, note, instance)


def _shared_board_note(name: str, what: str) -> str:
    return (
        f"{name} is {what}: NVML's power and energy are the whole board's, shared with any other MIG "
        f"instance on it, so its energy and the joules apportioned to its models over-count; its default "
        f"price is the whole board's too (set --device-price {name}=DOLLARS_PER_HOUR for the slice)"
    )


def _mig_mode(nvml, handle) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # not a MIG-capable GPU
        return False
    return current == MIG_ENABLED


def _order_note(environ: Mapping[str, str]) -> str:
    """Empty where CUDA numbers GPUs by PCI bus id, as this module does."""
    order = environ.get(ORDER_VARIABLE, "")
    if order == PCI_ORDER:
        return ""
    shown = f"{ORDER_VARIABLE}={order}" if order else f"{ORDER_VARIABLE} unset (CUDA orders fastest first)"
    return f"CUDA numbers GPUs by PCI bus id, and with {shown} it may not"


@functools.lru_cache(maxsize=32)
def _warn_once(message: str) -> None:
    """visible_gpus() runs at every model load: say each problem once, not once per model."""
    log.warning("%s", message)


def text(value) -> str:
    """What NVML returns as a name or id: bytes from older bindings, str from newer ones."""
    return value.decode() if isinstance(value, bytes) else value
