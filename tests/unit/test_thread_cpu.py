"""The CPU the load generator reads from /proc: a process's threads named for onnxruntime (as the
server names the ones that run it) are counted apart, within the process's whole."""

import os
import threading
import time
from pathlib import Path

from server import processes
from server.tools.loadgen import process_tree_cpu, process_tree_cpu_by_kind


def burn(name: str, seconds: float, done: threading.Event, release: threading.Event) -> None:
    """Named, `seconds` of this process's CPU (the busy loop is most of it), then alive until released:
    /proc keeps a thread's CPU only while it lives."""
    processes.name_this_thread(name)
    ends = time.process_time() + seconds
    while time.process_time() < ends:
        sum(range(1000))
    done.set()
    release.wait(30)


def test_threads_named_for_onnxruntime_are_counted_apart_within_the_whole():
    before = process_tree_cpu_by_kind(os.getpid())
    done, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=burn, args=(f"{processes.INFERENCE_THREADS}test", 0.5, done, release))
    worker.start()
    done.wait(30)
    named = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    assert "ort-test" in named  # the name is set while the thread lives
    after = process_tree_cpu_by_kind(os.getpid())
    release.set()
    worker.join(30)
    inference = after["onnxruntime"] - before["onnxruntime"]
    whole = after["engine"] - before["engine"]
    assert 0.2 <= inference <= whole + 0.02, (inference, whole)
    assert process_tree_cpu(os.getpid()) >= after["engine"]  # the whole, once: onnxruntime's share is within it


def test_an_unnamed_thread_is_not_counted_as_onnxruntime():
    before = process_tree_cpu_by_kind(os.getpid())["onnxruntime"]
    done, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=burn, args=("codec", 0.3, done, release))
    worker.start()
    done.wait(30)
    after = process_tree_cpu_by_kind(os.getpid())["onnxruntime"]
    release.set()
    worker.join(30)
    assert after - before < 0.05
