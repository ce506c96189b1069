"""Repeated log lines, limited: a warning or error said word for word again within a window is left
out, and the next one told says how many were. Seen without it: out of file descriptors, asyncio's
accept loop logged 739,000 identical tracebacks (329 MB) in three minutes, since it retries a full
backlog of accept() calls each time the listening socket is readable.

RepeatFilter goes on the root logger's handlers at start; loop_exception_handler replaces the event
loops' handler, so that the accept failure costs a counter, not a formatted traceback, each time.
"""

import logging
import resource
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's words (selector_events.py)
MAX_KEYS = 1024  # distinct lines remembered; beyond, the one told longest ago is forgotten
KEY_CHARACTERS = 500  # lines that agree this far are the same line


class Repeats:
    """Which lines may be told now: one per key per window. Thread-safe: /metrics logs from a thread
    of its own, the executor from others."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS) -> None:
        self.window, self._clock, self._max_keys = window, clock, max_keys
        self._seen: dict[object, list] = {}  # key -> [when last told, left out since]; oldest told first
        self._lock = threading.Lock()

    def admit(self, key: object) -> int | None:
        """None: leave this one out. Otherwise tell it, with the number left out since the last one told."""
        if self.window <= 0:
            return 0
        with self._lock:
            now = self._clock()
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return None
            left_out = self._seen.pop(key)[1] if seen is not None else 0
            self._seen[key] = [now, 0]
            if len(self._seen) > self._max_keys:
                del self._seen[next(iter(self._seen))]
        return left_out


class RepeatFilter(logging.Filter):
    """For a handler: warnings and errors at most once per window each; what is left out is counted
    on the next one told. Lines below WARNING pass untouched."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.repeats = Repeats(window, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = _message(record)
        exception = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        left_out = self.repeats.admit((record.name, record.levelno, text[:KEY_CHARACTERS], exception))
        if left_out is None:
            return False
        if left_out:
            record.msg, record.args = f"{text} [{_repeated(left_out, self.repeats.window)}]", None
        return True


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # arguments that do not fit the format: logging reports it when it emits
        return str(record.msg)


def _repeated(count: int, window: float) -> str:
    return f"and {count} more like this in the last {window:g} s, not logged"


def install(window: float) -> Callable:
    """RepeatFilter on each handler of the root logger that has none; returns the exception handler
    for event loops (loop.set_exception_handler)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(found, RepeatFilter) for found in handler.filters):
            handler.addFilter(RepeatFilter(window))
    return loop_exception_handler(Repeats(window))


def loop_exception_handler(repeats: Repeats) -> Callable:
    """An event loop's exception handler: accept() out of file descriptors is logged at most once per
    window, in one line without a traceback; anything else goes to asyncio's own handler."""

    def handle(loop, context: dict) -> None:
        if context.get("message") != ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        left_out = repeats.admit(ACCEPT_FAILED)
        if left_out is None:
            return
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.error(
            "cannot accept new connections: %s (open-file limit %d); asyncio retries each second%s",
            context.get("exception"),
            files,
            f" [{_repeated(left_out, repeats.window)}]" if left_out else "",
        )

    return handle
