"""What each of the server's processes does to itself: with several front ends, its title, which
tells operators which process is which in ps and top; its threads' names where they run
onnxruntime (`ort-run`, `ort-pool`: top -H and /proc/PID/task/TID/comm tell inference CPU from
the rest, as bench's load generator reports it); and, once it serves, its heap.

The heap: the cyclic garbage collector's full passes rescan every object the process holds, most
of them made once at start-up (modules, protobuf descriptors, sessions); under load those passes
cost the engine about a tenth of its CPU per request (bench/engine_cost.py, with gc.callbacks
timing them). Objects that exist once the process serves are frozen out of the collector's view,
and the youngest generation is collected after more allocations than Python's default of 700, so
that a request's short-lived objects die by reference count before a pass meets them."""

import ctypes
import gc
import logging
import os
import threading
from contextlib import suppress
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_NAME = 15  # linux/prctl.h: the 15-byte name top and ps -o comm show
YOUNG_GENERATION_THRESHOLD = 10_000  # allocations between collections of the youngest generation


def set_title(role: str) -> None:
    """`onnxserve: <role>` in ps, top and /proc/PID/cmdline, in place of the command line."""
    title = f"onnxserve: {role}"
    try:
        from setproctitle import setproctitle  # a dependency: this import fails only in a broken install
    except ImportError:
        log.warning("setproctitle is not installed: this process is named %r only where ps shows 15 bytes", title)
        ctypes.CDLL(None).prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)
        return
    setproctitle(title)


def settle_heap() -> None:
    """Called once the process serves: what start-up made is no longer scanned."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


INFERENCE_THREADS = "ort-"  # the prefix of the names of threads that run onnxruntime


def thread_ids() -> set[int]:
    """This process's threads, as the kernel numbers them."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def name_threads(tids, name: str) -> None:
    """OS names (15 bytes) for threads of this process; one that has ended is passed over."""
    for tid in tids:
        with suppress(OSError):
            Path(f"/proc/self/task/{tid}/comm").write_text(name[:15])


def name_this_thread(name: str) -> None:
    name_threads((threading.get_native_id(),), name)
