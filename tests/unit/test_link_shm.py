"""Big tensors over the link through /dev/shm (server/frontend/link_shm.py, link.pack_tensors): what
one side writes the other maps and the name is gone; small ones, and any a full /dev/shm cannot
take, ride in the frame; names nobody will take are unlinked, a dead front end's too."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.frontend import link, link_shm
from server.frontend.link_shm import SharedTensors

pytestmark = pytest.mark.skipif(not link_shm.SHARED_MEMORY.is_dir(), reason="no /dev/shm here")


def ours() -> set[str]:
    return {name for name in os.listdir(link_shm.SHARED_MEMORY) if name.startswith(f"onnxserve-{os.getpid()}-")}


def roundtrip(arrays: dict, shared: SharedTensors) -> tuple[list, dict]:
    specs, body = link.pack_tensors(arrays, shared)
    return specs, link.unpack_tensors(specs, memoryview(b"".join(bytes(part) for part in body)))


def test_a_big_tensor_goes_through_shared_memory_and_its_name_is_gone_once_taken():
    big = np.arange(64 * 1024, dtype=np.float32).reshape(16, 4096)  # 256 KiB
    small = np.arange(8, dtype=np.int64)
    specs, body = link.pack_tensors({"big": big, "small": small}, SharedTensors(os.getpid(), "f"))
    assert specs[0][4].startswith(f"onnxserve-{os.getpid()}-f") and specs[1][4] == ""
    assert sum(len(part) for part in body) == small.nbytes, "only the small one rides in the frame"
    assert ours() == {specs[0][4]}
    arrays = link.unpack_tensors(specs, memoryview(b"".join(bytes(part) for part in body)))
    assert ours() == set(), "the receiver unlinked it as it mapped it"
    np.testing.assert_array_equal(arrays["big"], big)
    np.testing.assert_array_equal(arrays["small"], small)
    assert not arrays["big"].flags.writeable


def test_without_a_shared_memory_side_every_tensor_rides_in_the_frame():
    big = np.ones((4, 65536), dtype=np.float32)
    specs, arrays = roundtrip({"big": big}, None)
    assert specs[0][4] == ""
    np.testing.assert_array_equal(arrays["big"], big)


def test_a_full_tmpfs_fails_the_write_not_the_process(tmp_path, caplog):
    """ENOSPC from write(2), where writing a mapping would raise SIGBUS: a tmpfs of 1 MiB."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        shared = SharedTensors(os.getpid(), "f", directory=mount)
        big = np.ones((4, 131072), dtype=np.float32)  # 2 MiB: more than the tmpfs holds
        for _ in range(2):
            specs, arrays = roundtrip({"big": big}, shared)
            assert specs[0][4] == "" and os.listdir(mount) == []
            np.testing.assert_array_equal(arrays["big"], big)
        assert caplog.text.count("cannot take a tensor") == 1, "said once"
        fits = memoryview(bytes(512 * 1024))
        assert shared.put(fits) and len(os.listdir(mount)) == 1, "what fits still goes there"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_names_that_will_not_be_taken_are_unlinked():
    shared = SharedTensors(os.getpid(), "e")
    specs, _ = link.pack_tensors({"a": np.ones((2, 65536), np.float32), "b": np.ones((2, 65536), np.float32)}, shared)
    assert len(ours()) == 2
    link.discard_tensors(specs)
    assert ours() == set()


def test_a_failed_unpack_unlinks_what_it_did_not_take():
    shared = SharedTensors(os.getpid(), "f")
    specs, body = link.pack_tensors({"a": np.ones((2, 65536), np.float32)}, shared)
    wrong = [(name, wire, shape, size + 4, where) for name, wire, shape, size, where in specs]
    with pytest.raises(ValueError, match="holds"):
        link.unpack_tensors(wrong, memoryview(b""))
    assert ours() == set()


def test_a_gone_front_ends_tensors_are_removed_and_a_live_ones_kept():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    for pid in (dead_pid, os.getpid()):
        SharedTensors(pid, "f").put(memoryview(bytes(link_shm.MIN_BYTES)))
    assert link_shm.remove_stale() >= 1
    assert not list(link_shm.SHARED_MEMORY.glob(f"onnxserve-{dead_pid}-*"))
    assert len(ours()) == 1, "a live process's tensor stays"
    assert link_shm.remove_of(os.getpid()) == 1 and ours() == set()


def test_only_tensor_names_are_taken():
    for name in ("../etc/passwd", "onnxserve-1/../../x", "other-file"):
        with pytest.raises(ValueError, match="not a tensor's name"):
            link_shm.take(name, 4)
    link_shm.discard(["../../etc/hosts"])
    assert Path("/etc/hosts").exists()
