"""Thread sizing follows a container's CPU limit, not the node's cores; batches run on the event loop
only while their measured run times stay short."""

import math
import os

import numpy as np

from server.engine.cpus import cgroup_cpu_limit, cpu_cores
from server.engine.run_peak import INLINE_STRINGS, RUN_PEAK_DECAY, RunPeak, batch_bytes

AFFINITY = len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.0
    assert cpu_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cpu_cores(tmp_path) == AFFINITY


def test_cgroup_v1_quota_and_fractions(tmp_path):
    controller = tmp_path / "cpu,cpuacct"
    controller.mkdir()
    (controller / "cpu.cfs_quota_us").write_text("50000\n")
    (controller / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5
    assert cpu_cores(tmp_path) == 1  # never zero threads
    (controller / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_affinity(tmp_path):
    assert cpu_cores(tmp_path) == AFFINITY


def test_run_peak_goes_inline_only_while_measured_runs_stay_short():
    peak = RunPeak(limit=50e-6)
    assert not peak.inline, "the first batch runs in the thread: nothing is measured yet"
    peak.record(10e-6)
    assert peak.inline
    peak.record(2e-3)  # one slow batch: back to the thread at once
    assert not peak.inline
    fast = 0
    while not peak.inline:
        peak.record(10e-6)
        fast += 1
    # the slow batch is forgotten only gradually: 2 ms decays below 50 us in log(40)/-log(0.99) steps
    assert fast == math.ceil(math.log(2e-3 / 50e-6) / -math.log(RUN_PEAK_DECAY))


def test_a_batch_bigger_than_any_measured_short_runs_in_the_thread():
    peak = RunPeak.starting(500e-6, calibrated_seconds=20e-6, calibrated_bytes=128)  # calibration: 8 rows of 4 floats
    small, big = np.zeros((2, 4), np.float32), np.zeros((4096, 4), np.float32)
    assert peak.runs_inline(batch_bytes({"x": small}))
    assert not peak.runs_inline(batch_bytes({"x": big})), "a first big batch is measured in the thread"
    peak.record(300e-6, batch_bytes({"x": big}))  # measured there, shorter than the limit
    assert peak.runs_inline(batch_bytes({"x": big}))
    peak.record(
        1e-3, batch_bytes({"x": np.zeros((8192, 4), np.float32)})
    )  # too long: learnt nothing, all to the thread
    assert peak.measured_bytes == big.nbytes and not peak.runs_inline(batch_bytes({"x": small}))


def test_a_batch_of_more_than_a_few_strings_never_runs_on_the_loop():
    peak = RunPeak.starting(500e-6, calibrated_seconds=20e-6, calibrated_bytes=1 << 20)
    few, many = np.full((1, INLINE_STRINGS), "ab", dtype=object), np.full((1, INLINE_STRINGS + 1), "", dtype=object)
    assert batch_bytes({"s": few}) == 2 * INLINE_STRINGS and peak.runs_inline(batch_bytes({"s": few}))
    assert batch_bytes({"s": many}) is None and not peak.runs_inline(None)
    long = np.array([["x" * (2 << 20)]], dtype=object)  # one string, but longer than any batch measured
    assert not peak.runs_inline(batch_bytes({"s": long}))
    peak.record(10e-6, None)  # a batch of many strings ran short: it says nothing of their size
    assert peak.measured_bytes == 1 << 20
