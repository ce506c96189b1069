"""Big tensors between a front end and the engine through shared memory (/dev/shm).

Measured (bench/ipc.py, 2 cores): a 588 KiB tensor inside the link's frames costs 490 to 770 us a
round trip, through /dev/shm 68 us; from about 64 KiB on, shared memory costs less. The sender
writes the bytes once, with write(2), which fails with ENOSPC when /dev/shm is full (the tensor then
rides in the frame), where writing into a mapping would kill the process with SIGBUS. The receiver
maps them without a copy and unlinks the name at once: the memory goes with the last array over it.

Names are /dev/shm/onnxserve-<front end's pid>-<f|e><n>: f for what the front end writes, e for
what the engine writes to it. A name its receiver never took (the request failed first, the caller
went away) is unlinked where that is seen; when a front end's link ends, the engine unlinks every
name of its pid; and an engine starting unlinks the names of processes that are gone.
"""

import contextlib
import itertools
import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHARED_MEMORY = Path("/dev/shm")
MIN_BYTES = 64 * 1024  # smaller tensors ride in the frames
PREFIX = "onnxserve-"


class SharedTensors:
    """The names one side of one link writes tensors under."""

    def __init__(self, frontend_pid: int, side: str, directory: Path = SHARED_MEMORY) -> None:
        self.prefix = f"{PREFIX}{frontend_pid}-{side}"
        self.numbers = itertools.count()
        self.directory = directory
        self.available = directory.is_dir()
        self.refused = False  # logged once: /dev/shm could not take a tensor

    def put(self, data: memoryview) -> str:
        """The name `data` is under now, or "" where it rides in the frame: small, or no room."""
        if not self.available or len(data) < MIN_BYTES:
            return ""
        name = f"{self.prefix}{next(self.numbers)}"
        path = self.directory / name
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as err:
            return self._refused(err)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as err:
            path.unlink(missing_ok=True)
            return self._refused(err)
        finally:
            os.close(fd)
        return name

    def _refused(self, err: OSError) -> str:
        if not self.refused:
            self.refused = True
            log.warning(
                "%s cannot take a tensor (%s): big tensors ride in the link's frames while it cannot "
                "(a container's /dev/shm is 64 MiB unless it is given more)",
                self.directory,
                err,
            )
        return ""


def take(name: str, size: int, directory: Path = SHARED_MEMORY) -> memoryview:
    """The bytes under `name`, mapped read-only; the name is unlinked."""
    if not name.startswith(PREFIX) or "/" in name:
        raise ValueError(f"{name!r} is not a tensor's name in {directory}")
    path = directory / name
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        if os.fstat(fd).st_size != size:
            raise ValueError(f"{name} holds {os.fstat(fd).st_size} bytes, not {size}")
        return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


def discard(names: list[str], directory: Path = SHARED_MEMORY) -> None:
    """Names their receiver will not take."""
    for name in names:
        if name.startswith(PREFIX) and "/" not in name:
            (directory / name).unlink(missing_ok=True)


def remove_of(frontend_pid: int, directory: Path = SHARED_MEMORY) -> int:
    """Unlink every name of a front end whose link ended; how many there were."""
    found = list(directory.glob(f"{PREFIX}{frontend_pid}-*")) if directory.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def remove_stale(directory: Path = SHARED_MEMORY) -> int:
    """Unlink the names of front ends that are gone (an engine killed leaves them); how many."""
    removed = 0
    for path in directory.glob(f"{PREFIX}*-*") if directory.is_dir() else ():
        owner = path.name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed
