"""onnxserve-tune's report: the machine it ran on, the progress lines, the terminal tables and
the JSON document."""

import dataclasses
import datetime
import importlib.metadata
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from server.observe import nvml_devices
from server.tools.loadgen import process_tree_cpu
from server.tune.search import Capacity, Choice, Measurement, meets

SHARED_ABOVE = 0.10  # other processes' share of the CPUs above which the machine counts as shared


def machine() -> dict:
    """What a tuned configuration depends on: it is labelled with this, as a config tuned on one
    machine need not suit another."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    found = {
        "cpu_model": _cpu_model(),
        "cores": cores,
        "gpus": _gpu_names(),
        "onnxruntime": _version("onnxruntime-gpu") or _version("onnxruntime") or "unknown",
        "onnxserve": _version("onnxserve") or "unknown",
        "python": platform.python_version(),
        "host": platform.node(),
    }
    gpu = f", {', '.join(found['gpus'])}" if found["gpus"] else ", no GPU"
    found["label"] = f"{found['cpu_model']} ({cores} cores{gpu}), onnxruntime {found['onnxruntime']}"
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _gpu_names() -> list[str]:
    """The GPUs CUDA sees, in CUDA's order: a tune measures those, not every board NVML lists."""
    return nvml_devices.gpu_names()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Sharing:
    """How much CPU other processes took while the tune ran: the tool and its server are
    subtracted from the machine's busy time (/proc/stat)."""

    def __init__(self, server_is_child: bool) -> None:
        self.server_is_child = server_is_child  # else the server's CPU cannot be told from others'
        self.begin = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)) / tick  # minus idle and iowait
        ours = process_tree_cpu(os.getpid())  # the tool and its children: the server it started
        return busy, ours, sum(ticks) / tick

    def result(self) -> dict:
        busy, ours, total = (after - before for after, before in zip(self._sample(), self.begin))
        if not self.server_is_child or total <= 0:
            return {"measured": False, "note": "not measured: the server was not started by the tool"}
        share = max(0.0, busy - ours) / total
        shared = share > SHARED_ABOVE
        note = (
            f"shared: other processes used {share:.0%} of the CPUs while tuning; figures carry that noise"
            if shared
            else f"other processes used {share:.0%} of the CPUs while tuning"
        )
        return {"measured": True, "other_cpu_share": round(share, 3), "shared": shared, "note": note}


def progress_line(point: Measurement, elapsed: float, budget_s: float) -> str:
    stability = "stable" if point.stable else "NOISY"
    cost = f"${point.cost_per_million:.4g}/1M" if point.cost_per_million is not None else "$?/1M"
    return (
        f"[{elapsed:5.0f}s/{budget_s:.0f}s] {point.config:<28} @ {point.rate:g}/s: p50 {ms(point.p50_ms)} ms, "
        f"p99 {ms(point.p99_ms)} ms, {point.throughput:.4g}/s, {cost}, {point.errors} errors, "
        f"{stability} (noise {point.noise:.0%}, {point.windows} windows)"
    )


@dataclass
class Outcome:
    """Everything the tune found, for the table and the JSON document."""

    measurements: list[Measurement] = field(default_factory=list)
    configs: dict = field(default_factory=dict)  # label -> {"config": ModelConfig JSON, "status", "reason", ...}
    capacities: dict[str, Capacity] = field(default_factory=dict)
    choices: list[Choice] = field(default_factory=list)
    pareto: dict[float, list[str]] = field(default_factory=dict)
    break_even: dict = field(default_factory=dict)
    failure: dict | None = None
    notes: list[str] = field(default_factory=list)
    written: dict | None = None


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _num(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def ms(value: float | None) -> str:
    """Milliseconds with three significant figures and no exponent: 0.981, 7.58, 176, 5550."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def text(outcome: Outcome, p99_ms: float, header: dict) -> str:
    out = [
        f"onnxserve-tune: model '{header['model']}', p99 <= {p99_ms:g} ms, on {header['machine']['label']}, {header['date']}"
    ]
    out.append(f"prices: {header['prices_note']}")
    out += [
        "",
        "Measurements (one replica; p50/p99 client-side from each request's scheduled start; srv p99 from the "
        "server's histogram, buckets 2.5x apart, rough):",
    ]
    rows = [
        [
            m.config,
            f"{m.rate:g}",
            ms(m.p50_ms),
            ms(m.p99_ms),
            ms(m.server_p99_ms),
            f"{m.throughput:.4g}",
            _num(m.cost_per_million, ".4g"),
            _num(m.busy_share, ".0%"),
            _num(m.joules_per_inference),
            _num(m.mean_batch, ".2f"),
            str(m.errors),
            ("yes" if meets(m, p99_ms) else "no"),
            ("stable" if m.stable else "noisy") + f" {m.noise:.0%}",
        ]
        for m in outcome.measurements
    ]
    out += _table(
        [
            "config",
            "rate/s",
            "p50 ms",
            "p99 ms",
            "srv p99",
            "inf/s",
            "$/1M",
            "busy",
            "J/inf",
            "batch",
            "errors",
            "meets",
            "noise",
        ],
        rows,
    )
    out += ["", "Highest rate within the p99 (one replica):"]
    for label, cap in outcome.capacities.items():
        if cap is not None:
            bound = (
                f"failed at {cap.failed_at:g}/s"
                if cap.failed_at
                else "no higher rate failed beyond the noise: a lower bound"
            )
            out.append(f"  {label:<28} {_num(cap.rate, 'g', '/s') if cap.rate else 'none measured'} ({bound})")
    out += ["", "Cheapest configuration meeting the p99, per rate (cost with the replicas that rate needs):"]
    for choice in outcome.choices:
        tied = f"; tied with {', '.join(choice.tied_with)}" if choice.tied_with else ""
        out.append(
            f"  {choice.rate:g}/s: {choice.config} x{choice.replicas} replica(s), ${choice.cost_per_million:.4g} per 1M "
            f"inferences ({choice.reason}{tied})"
        )
    for rate, front in outcome.pareto.items():
        found = {(m.config, m.rate): m for m in outcome.measurements}
        shown = [
            f"{c} (${_num(found[c, rate].cost_per_million, '.4g')}/1M, p99 {ms(found[c, rate].p99_ms)} ms)"
            for c in front
        ]
        out.append(f"Pareto front (cost, p99) at {rate:g}/s: {'; '.join(shown) or 'none measured'}")
    out.append(f"Break-even between devices: {outcome.break_even.get('note', '')}")
    if outcome.failure:
        out += ["", f"NO CONFIGURATION MEETS THE TARGET: {outcome.failure['message']}"]
    out += ["", *(f"note: {note}" for note in outcome.notes)]
    if outcome.written:
        out.append(f"written: {outcome.written['message']}")
    return "\n".join(out)


def document(outcome: Outcome, header: dict) -> dict:
    """The JSON report: the header (tool, date, machine, arguments, prices), then every result."""
    return {
        **header,
        "measurements": [dataclasses.asdict(m) for m in outcome.measurements],
        "configurations": outcome.configs,
        "max_rate_within_p99": {k: dataclasses.asdict(v) for k, v in outcome.capacities.items() if v is not None},
        "winners": [_choice(c) for c in outcome.choices],
        "pareto_front": {f"{rate:g}": front for rate, front in outcome.pareto.items()},
        "break_even": outcome.break_even,
        "failure": outcome.failure,
        "notes": outcome.notes,
        "written_config": outcome.written,
    }


def _choice(choice: Choice) -> dict:
    found = dataclasses.asdict(choice)
    found["measured"] = dataclasses.asdict(choice.measured) if choice.measured else None
    return found
