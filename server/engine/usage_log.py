"""The usage log: one JSON line per finished request, for invoicing (`--usage-log PATH`).

The event loop only appends a record to a bounded buffer; a writer thread turns records into
lines, writes them and fsyncs every --usage-log-fsync-ms. Each request reserves its place in the
buffer when it is accepted, so a full buffer refuses new requests (the caller sees UNAVAILABLE)
instead of serving them unbilled, and an accepted request always has room for its record.

What a crash can cost: SIGTERM loses nothing (the server drains, then the writer flushes and
fsyncs), unless the disk does not answer within what is left of --exit-timeout-secs: the records
not known to be written are then counted, in the log and the exit status. SIGKILL loses only
records not yet written (at most one fsync period); power loss at most the records since the last
fsync. Lines are whole or torn at the end only: on open, a torn last line left by a crash is cut
off, and the reader skips one it finds.

Rotation is by size: past --usage-log-max-bytes the file is renamed PATH.N and a new PATH is
started. N is one above both the highest number already there and the last one this log ever
used, kept in .NAME.rotation beside it (written atomically before the rename), so numbers only
grow, across files shipped and deleted and across restarts: a shipper never sees a number twice.
The new file is opened before the old one is given up: when it cannot be (no descriptor left, no
space, a damaged state file), records keep going to the current file and the rotation is retried
later. Nothing is ever deleted by the server.

The writer thread owns the file: it alone writes, fsyncs, rotates and closes it, and no failure
ends it, since a dead writer would refuse every request from then on.
"""

import collections
import datetime
import logging
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path

import orjson

from server.observe.log_limits import Repeats

log = logging.getLogger(__name__)

SCHEMA = 1
ROTATION_RETRY_SECONDS = 1.0  # after a failed rotation; records go on to the current file meanwhile
ROTATION_LOG_SECONDS = 60.0  # a rotation that keeps failing, or a bug in the writer, is logged this often
# The fields of a record, in order (see README, "Usage log"); the loop hands the writer tuples.
FIELDS = (
    "time",
    "request_id",
    "tenant",
    "tenant_source",
    "model",
    "version",
    "protocol",
    "outcome",
    "rows",
    "device",
    "batch_id",
    "batch_rows",
    "queue_us",
    "compute_us",
    "cost_dollars",
    "energy_joules",
    "price_dollars_per_hour",
    "price_source",
)


class UsageLog:
    def __init__(self, path: str, fsync_ms: int, max_bytes: int, capacity: int) -> None:
        self.path = Path(path)
        self.fsync_seconds = fsync_ms / 1000
        self.max_bytes = max_bytes
        self.capacity = capacity
        self.server = f"{socket.gethostname()}/{os.getpid()}"
        self.written = 0  # records on disk (written; fsynced within one period)
        self.refused = 0  # requests refused because the buffer was full
        self._reserved = 0  # accepted requests whose record is not in the buffer yet (loop thread only)
        self._buffer: collections.deque = collections.deque()  # records waiting for the writer
        self._sequence = 0
        self._unwritten = memoryview(b"")  # taken from the buffer, not yet all written
        self._unwritten_count = 0
        self._closing = threading.Event()
        self._fd = -1
        self._regular = True
        self._size = 0
        self._last_number = 0  # the highest PATH.N this process has used or seen
        self._retry_at = 0.0  # time.monotonic() of the next rotation attempt after a failure
        self._failed_rotations = 0
        self._rotations = 0
        self._told = Repeats(ROTATION_LOG_SECONDS)  # the writer's repeated failures: one line per window
        self._error = ""  # why the last write failed
        self._thread = threading.Thread(target=self._run, name="usage-log", daemon=True)

    # --- the event loop's side ------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating) the file for appending, cut a torn last line, start the writer."""
        self._fd = self._open_file()
        self._thread.start()
        log.info(
            "usage log: %s (fsync every %g ms, rotation %s)",
            self.path,
            self.fsync_seconds * 1000,
            f"past {self.max_bytes} bytes" if self.max_bytes and self._regular else "off",
        )

    def reserve(self) -> bool:
        """Room for one more request's record; False when the disk is this far behind."""
        if self._reserved + self.depth >= self.capacity:
            self.refused += 1
            return False
        self._reserved += 1
        return True

    def append(self, record: tuple) -> None:
        """The record of a request that reserved its place: `FIELDS` in order, time as epoch seconds."""
        self._reserved -= 1
        self._buffer.append(record)

    @property
    def depth(self) -> int:
        """Records waiting for the disk."""
        return len(self._buffer) + self._unwritten_count

    def behind_message(self) -> str:
        return (
            f"usage log is behind: {self.depth} records wait for the disk "
            f"(--usage-log-buffer-records {self.capacity}); retry later"
        )

    def close(self, timeout: float | None = None) -> int:
        """Have the writer write and fsync every record left and close the file, and wait for it up to
        `timeout` seconds (None: as long as that takes). Returns the number of records not known to be
        on disk, which it logs (0: every one is). Blocks: call it off the loop."""
        self._closing.set()
        self._thread.join(timeout)
        hung = self._thread.is_alive()  # in a write or an fsync that does not return: it keeps the file
        lost = self.depth  # a hung writer is blocked in a system call: what it holds is not moving
        if hung and lost:
            log.error(
                "usage log: %d records are not known to be written to %s: its writer has waited on the disk for "
                "over %g s (a disk or mount that does not answer); %d were written",
                lost,
                self.path,
                timeout,
                self.written,
            )
        elif hung:
            log.warning(
                "usage log: closed after %d records, all written; its writer is still waiting on the disk after "
                "rotating %s",
                self.written,
                self.path,
            )
        elif lost:
            log.error(
                "usage log: %d records could not be written to %s (%s): they are lost; %d were written",
                lost,
                self.path,
                self._error or "not fsynced",
                self.written,
            )
        else:
            log.info("usage log: closed after %d records", self.written)
        if self._reserved:  # requests accepted whose batches still ran when the server stopped
            log.error("usage log: %d accepted requests have no record: they were still running at exit", self._reserved)
        return lost

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing.wait(self.fsync_seconds):
                self._flush()
            if not self._flush():  # the last records: once more, the failure may have passed
                self._flush()
        finally:
            _close_descriptor(self._fd, self.path)

    def _flush(self) -> bool:
        """_write_pending; on a failure the records stay buffered (new requests are refused once the
        buffer is full) and the next period tries again. False when it failed."""
        try:
            self._write_pending()
            return True
        except OSError as err:
            self._error = err.strerror or str(err)
            log.error("usage log: cannot write %s (%s); %d records wait", self.path, err, self.depth)
        except Exception as err:  # noqa: BLE001 - a bug: the writer must outlive it (see the module's docstring)
            self._error = f"{type(err).__name__}: {err}"
            if self._told.admit(("write", self._error)) is not None:
                log.exception("usage log: writing %s failed; %d records wait", self.path, self.depth)
        return False

    def _write_pending(self) -> None:
        """Write the buffered records as one chunk and fsync. A failed write is resumed from the
        byte where it stopped, so no line is ever split or written twice."""
        if not self._unwritten and self._buffer:
            count = len(self._buffer)
            lines = [self._line(self._buffer[index]) for index in range(count)]
            self._unwritten = memoryview(b"".join(lines))
            self._unwritten_count += count  # += : those of a failed fsync are still counted here
            for _ in range(count):
                self._buffer.popleft()
        while self._unwritten:
            self._unwritten = self._unwritten[os.write(self._fd, self._unwritten) :]
        if not self._unwritten_count:
            return
        if self._regular:
            os.fsync(self._fd)
            self._size = os.fstat(self._fd).st_size
        self.written += self._unwritten_count
        self._unwritten_count = 0
        if self.max_bytes and self._regular and self._size >= self.max_bytes:
            self._rotate()

    def _line(self, record: tuple) -> bytes:
        self._sequence += 1
        document = dict(zip(FIELDS, record))
        document["time"] = _iso_time(document["time"])
        return orjson.dumps({"schema": SCHEMA, "server": self.server, "seq": self._sequence, **document}) + b"\n"

    def _open_file(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        found = os.fstat(fd)
        self._regular = stat.S_ISREG(found.st_mode)  # a FIFO or /dev/stdout: no fsync, no rotation
        self._size = found.st_size if self._regular else 0
        if self._regular and self._size:
            self._size = _cut_torn_tail(self.path, fd, self._size)
        return fd

    def _rotate(self) -> None:
        """PATH becomes PATH.N and a new PATH is started. A failure, whatever it is, leaves the current
        file in use, with every record in it, and is retried ROTATION_RETRY_SECONDS later."""
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            target = self._swap_files()
        except Exception as err:  # noqa: BLE001 - a bug included: the records still have a file (see _flush)
            self._retry_at, self._failed_rotations = now + ROTATION_RETRY_SECONDS, self._failed_rotations + 1
            # Keyed by the rotations done so far: the first failure after a success is always told.
            if self._told.admit(("rotate", self._rotations)) is not None:
                log.error(
                    "usage log: cannot rotate %s (%s); records go on to it, and rotation is retried every %g s",
                    self.path,
                    err,
                    ROTATION_RETRY_SECONDS,
                    exc_info=not isinstance(err, OSError),
                )
            return
        log.info(
            "usage log: rotated to %s%s",
            target,
            f" after {self._failed_rotations} failed attempt(s)" if self._failed_rotations else "",
        )
        self._failed_rotations, self._rotations = 0, self._rotations + 1
        try:
            _fsync_directory(self.path.parent)  # the renames and the new file survive a power loss
        except OSError as err:
            log.warning("usage log: cannot fsync the directory of %s after rotating it: %s", self.path, err)

    def _swap_files(self) -> Path:
        """Open the new file first; only then rename PATH to PATH.N and the new one to PATH, and give
        the old descriptor up. Never a moment where records go to a closed (reusable) descriptor."""
        fresh_path = self.path.with_name(f".{self.path.name}.next")  # a dot: shippers' globs skip it
        fresh = os.open(fresh_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            target = self.path.with_name(f"{self.path.name}.{self._next_number()}")
            os.rename(self.path, target)
            try:
                os.rename(fresh_path, self.path)
            except OSError:
                os.rename(target, self.path)  # undone: the current file keeps its name
                raise
        except BaseException:  # whatever it is: the new file must not stay open, nor be left behind
            os.close(fresh)
            _discard(fresh_path)
            raise
        old, self._fd, self._size = self._fd, fresh, 0
        _close_descriptor(old, target)  # every record in it was written and fsynced before the rotation began
        return target

    def _next_number(self) -> int:
        """One above the highest number present and the last one saved, saved before it is used:
        a crash after the rename then skips a number, never reuses one."""
        state = self.path.with_name(f".{self.path.name}.rotation")
        pattern = re.compile(re.escape(self.path.name) + r"\.(\d+)")
        present = [int(match.group(1)) for name in os.listdir(self.path.parent) if (match := pattern.fullmatch(name))]
        number = max(self._last_number, _saved_number(state), *present) + 1
        _write_atomically(state, f"{number}\n".encode())
        self._last_number = number
        return number


def _saved_number(state: Path) -> int:
    """The number saved in the state file; 0 when there is none or it cannot be read or parsed (then
    logged): numbering goes on from the files present and from this process's own."""
    try:
        content = state.read_bytes()  # not text: a damaged file may hold any bytes
    except FileNotFoundError:
        return 0
    except OSError as err:
        log.warning(
            "usage log: the rotation state %s cannot be read (%s): numbering goes on from the files present", state, err
        )
        return 0
    try:
        return int(content.strip())  # ASCII digits only, from bytes
    except ValueError:
        log.warning(
            "usage log: the rotation state %s is damaged (%r): numbering goes on from the files present",
            state,
            content[:40],
        )
        return 0


def _write_atomically(path: Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_descriptor(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    except OSError as err:  # NFS may report a failed write-back here; every record was fsynced, or is counted lost
        log.warning("usage log: cannot close %s: %s", path, err)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("usage log: cannot remove %s: %s", path, err)


def _cut_torn_tail(path: Path, fd: int, size: int) -> int:
    """A crash mid-write can leave a last line without its newline: cut it off, so that every
    line of the file is a whole record. Returns the new size."""
    keep = size
    with open(path, "rb") as reader:
        while keep:
            start = max(0, keep - 65536)
            reader.seek(start)
            chunk = reader.read(keep - start)
            if keep == size and chunk.endswith(b"\n"):
                return size
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
    log.warning("usage log: %s ended with a torn record of %d bytes (a crash); cut off", path, size - keep)
    os.ftruncate(fd, keep)
    return keep


def _iso_time(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spend_records(path: str):
    """(tenant, time in seconds since the epoch, dollars) of each record in the log at `path` and in
    its rotated files (PATH.N) still beside it; torn or foreign lines are skipped. Blocking."""
    current = Path(path)
    rotated = [found for found in current.parent.glob(f"{current.name}.*") if found.suffix[1:].isdigit()]
    rotated.sort(key=lambda found: int(found.suffix[1:]))  # oldest first: PATH.2 before PATH.10
    for file in [*rotated, current]:
        try:
            with open(file, "rb") as lines:
                for line in lines:
                    found = _spend(line)
                    if found is not None:
                        yield found
        except OSError as err:
            log.warning("usage log: %s cannot be read for the tenants' spend: %s", file, err)


def _spend(line: bytes) -> tuple[str, float, float] | None:
    try:
        record = orjson.loads(line)
        at = datetime.datetime.fromisoformat(record["time"]).timestamp()
        return record["tenant"], at, float(record.get("cost_dollars") or 0.0)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
