"""What the front-end processes measure, on the engine's one /metrics (--frontends N > 1).

Every request's series (counts, latencies, batches, cost, tenants) are the engine's already: it
ends each request, whichever front end took it. What a front end alone sees is its listeners'
connections (server/frontend/listeners.py) and its own CPU and memory. The connection series are
kept in prometheus_client's multiprocess files (each front end starts with PROMETHEUS_MULTIPROC_DIR
set, and its counters outlive it, as a counter must); at a scrape they are summed over the front
ends with the engine's own (its /metrics listener), one family per name. CPU and memory are read
from /proc for each front end, labelled by its number."""

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class FrontendSeries:
    """A collector for the engine's registry. `own`: the engine's own series of the same names;
    `pids()`: each running front end's number and process id; `restarts()`: how many times front
    ends have been started again."""

    def __init__(
        self,
        directory: str,
        own: CollectorRegistry,
        pids: Callable[[], dict[int, int]],
        restarts: Callable[[], int],
    ) -> None:
        self.directory, self.own, self.pids, self.restarts = directory, own, pids, restarts

    def describe(self) -> list:
        return []  # names are not claimed: they come and go with the front ends' files

    def collect(self) -> Iterable[Metric]:
        yield from merged((*MultiProcessCollector(None, path=self.directory).collect(), *self.own.collect()))
        cpu = CounterMetricFamily(
            "onnxserve_frontend_cpu_seconds",
            "CPU time (user and system) of each front-end process",
            labels=["frontend"],
        )
        memory = GaugeMetricFamily(
            "onnxserve_frontend_resident_memory_bytes", "Resident memory of each front-end process", labels=["frontend"]
        )
        for index, pid in sorted(self.pids().items()):
            found = read_process(pid)
            if found is not None:
                cpu.add_metric([str(index)], found[0])
                memory.add_metric([str(index)], found[1])
        restarts = CounterMetricFamily(
            "onnxserve_frontend_restarts", "Front-end processes started again after one exited", value=self.restarts()
        )
        yield from (cpu, memory, restarts)


def merged(families: Iterable[Metric]) -> Iterable[Metric]:
    """One family per name, each sample (name and labels) summed over the families that have it."""
    by_name: dict[str, Metric] = {}
    sums: dict[str, dict] = {}
    for family in families:
        by_name.setdefault(family.name, family)
        totals = sums.setdefault(family.name, {})
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            previous = totals.get(key)
            totals[key] = sample if previous is None else previous._replace(value=previous.value + sample.value)
    for name, family in by_name.items():
        family.samples = list(sums[name].values())
        yield family


def read_process(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, resident bytes) of a process from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[21]) * PAGE
