"""How many cores this process may use: its CPU affinity, capped by a container's CPU quota. Every
thread count the server chooses (intra-op threads, calibration's candidates, the CPU's price)
starts here."""

import math
import os
from pathlib import Path


def cpu_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU limit.

    Kubernetes limits CPU with a cgroup quota, not with affinity, so without the cap a
    pod limited to 2 cores on a 64-core node would start 64 intra-op threads and be throttled.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return cores if limit is None else max(1, min(cores, math.floor(limit)))


def cgroup_cpu_limit(root: Path) -> float | None:
    """The CPU quota in cores (cgroup v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    v2 = _read_words(root / "cpu.max")  # "max 100000" or "200000 100000"
    if v2 is not None and len(v2) == 2:
        return None if v2[0] == "max" else int(v2[0]) / int(v2[1])
    for controller in ("cpu", "cpu,cpuacct"):
        quota = _read_words(root / controller / "cpu.cfs_quota_us")
        period = _read_words(root / controller / "cpu.cfs_period_us")
        if quota and period:
            return None if int(quota[0]) <= 0 else int(quota[0]) / int(period[0])
    return None


def _read_words(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except OSError:  # absent on this kernel or cgroup version
        return None
