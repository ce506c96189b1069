"""The GPU check's front-end step: one engine fed by 1, 2, 4, 8 and 14 front-end processes
(`--frontends N`, as many as the cores allow), serving the benchmark MLP on the GPU (small: the
front ends, not the GPU, set the limit), driven by several load generators at 64 callers each.
Each row has the throughput, the p50 and the CPU per request of the engine and of the front ends
(/proc): throughput should rise with N until the engine, the GPU or the machine is full, and the
engine's CPU per request should stay a small part of a front end's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench.gpu_steps import GRPC_ONLY, ON_GPU, Context, Failed, write_models
from bench.serving import ROOT, start_server
from server.engine.cpus import cpu_cores
from server.tools.loadgen import process_tree_cpu_by_kind

COUNTS = (1, 2, 4, 8, 14)
BUDGET_SECONDS = 100.0  # no new count starts past this (the step's limit is 150 s): what ran is kept
CONCURRENCY = 64  # callers per load generator
MAX_GENERATORS = 6  # load generators: one per two front ends, each a process of its own


def counts(cores: int) -> list[int]:
    """The front-end counts this machine can run: at least 1 and 2 (the plumbing, on 2 cores)."""
    return [count for count in COUNTS if count <= max(2, cores - 2)]


def generators(frontends: int) -> int:
    return max(1, min(MAX_GENERATORS, (frontends + 1) // 2))


def frontends(ctx: Context) -> dict:
    ctx.stop()  # the shared server holds the GPU and cores: it is not needed here
    config = "" if ctx.plan.cpu else ON_GPU
    repository = write_models(ctx.plan.workdir / "frontends", {"mlp": ("mlp", config, ())})
    found = {"cores": cpu_cores(), "frontend_rows": [], "not_measured": []}
    began = time.monotonic()
    for count in counts(found["cores"]):
        if time.monotonic() - began > BUDGET_SECONDS:
            found["not_measured"].append(count)  # out of the step's time: the table keeps what ran
            continue
        ctx.say(f"mlp: --frontends {count}, {generators(count)} load generator(s) ...")
        found["frontend_rows"].append(measure(repository, count, ctx.plan.seconds))
    rows = found["frontend_rows"]
    base = rows[0]["inferences_per_second"]
    found["summary"] = "mlp inf/s by front ends: " + ", ".join(
        f"{row['frontends']}: {row['inferences_per_second']:,.0f} ({row['inferences_per_second'] / base:.1f}x)"
        for row in rows
    )
    if found["not_measured"]:
        found["summary"] += f"; not measured for time: {found['not_measured']}"
    split = [row for row in rows if row["frontend_us"]]
    if split:
        best = max(split, key=lambda row: row["inferences_per_second"])
        found["summary"] += f"; engine/front end CPU at {best['frontends']}: {best['engine_share']:.2f}"
    if errors := sum(row["errors"] for row in rows):
        raise Failed(f"{errors} requests failed; {found['summary']}", found)
    return found


def measure(repository, count: int, seconds: float) -> dict:
    server = start_server(repository, *GRPC_ONLY, "--frontends", str(count), timeout=300)
    try:
        run_generators(server.url, generators(count), min(seconds, 2.0))  # warm: every front end, every pool
        before, began = process_tree_cpu_by_kind(server.process.pid), time.perf_counter()
        reports = run_generators(server.url, generators(count), seconds)
        wall, after = time.perf_counter() - began, process_tree_cpu_by_kind(server.process.pid)
    finally:
        server.stop()
    requests = sum(report["requests"] for report in reports) or 1
    engine, front = ((after[kind] - before[kind]) / requests * 1e6 for kind in ("engine", "frontend"))
    return {
        "frontends": count,
        "generators": len(reports),
        "inferences_per_second": sum(report["inferences_per_second"] for report in reports),
        "p50_ms": max(report["p50_ms"] for report in reports),
        "engine_us": engine,
        "frontend_us": front,
        "engine_share": engine / front if front else None,
        "errors": sum(report["errors"] for report in reports),
        "seconds": round(wall, 1),
    }


def run_generators(url: str, count: int, seconds: float) -> list[dict]:
    command = [sys.executable, "-m", "bench.loadgen", "--url", url, "--model", "mlp", "--json"]
    command += ["--concurrency", str(CONCURRENCY), "--duration", str(seconds)]

    def one(_) -> dict:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
        if not done.stdout.strip():
            raise RuntimeError(f"load generator failed: {done.stderr[-1500:]}")
        return json.loads(done.stdout)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def markdown_rows(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "| front ends | load generators | inf/s | p50 ms | engine CPU us/req | front ends CPU us/req | engine / front end | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = f"{row['engine_share']:.3f}" if row["engine_share"] is not None else "-"
        lines.append(
            f"| {row['frontends']} | {row['generators']} | {row['inferences_per_second']:,.0f} | {row['p50_ms']:.3f} "
            f"| {row['engine_us']:,.0f} | {row['frontend_us']:,.0f} | {share} | {row['errors']} |"
        )
    return lines
