"""Thread sizing follows a container's CPU limit, not the node's cores; batches run on the event loop
only while their measured run times stay short."""

import math
import os

from server.runtime import RUN_PEAK_DECAY, RunPeak, cgroup_cpu_limit, cpu_cores

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
