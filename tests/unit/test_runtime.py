"""Thread sizing follows a container's CPU limit, not the node's cores."""

import os

from server.runtime import cgroup_cpu_limit, cpu_cores

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
