"""Fair share under overload, measured: tenant B sends 10% of the server's capacity (open loop,
Poisson arrivals) alone, then again while tenant A floods it (closed loop, 256 callers, far past
capacity); B's p99 and refusals in both, on the benchmark MLP and ResNet-50 at default settings,
the tenants named by the x-tenant-id header (--trust-tenant-header). Then where B's time goes: B's
requests one at a time, alone and under the flood, each response's queue and compute times against
its whole latency.

    python -m bench.fair_share [--duration 10] [--limits FILE]

Target (the tenant limits' fair share): B's p99 under A's flood within 2x its p99 alone, and no
request of B's refused. `--limits` serves a --tenant-limits file (weights, rates, in-flight caps)."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import make_models, print_targets
from bench.serving import ROOT, start_server
from server import protocol
from server.engine.inference import COMPUTE_PARAMETER, QUEUE_PARAMETER
from server.tools.loadgen import METHOD, build_request

MODELS = ("mlp", "resnet50")  # the MLP: the transport is the work; ResNet-50: the model is
FLOOD_CALLERS, SHARE = 256, 0.10
PROBES, PROBE_GAP = 60, 0.02  # B's requests one at a time (for `seconds` at most): queue and compute times read
TARGET = 2.0  # B's p99 under the flood over its p99 alone, at most


def loadgen(url: str, model: str, tenant: str, *load: str, seconds: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.loadgen", "--url", url, "--model", model, "--json", "--warmup", "0"]
    command += ["--header", f"x-tenant-id={tenant}", "--duration", str(seconds), *load]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    if not out.strip():
        raise RuntimeError(f"load generator failed: {err[-1500:]}")
    return json.loads(out)


def breakdown(url: str, model: str, found: dict, seconds: float) -> None:
    """Where B's time goes: one request at a time, the response's queue and compute times against
    its whole latency (the rest: transport, decoding, encoding and the event loop's turns)."""
    payload, rows = build_request(url, model, 1, {}), []
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)
        ends = time.monotonic() + seconds
        while len(rows) < PROBES and time.monotonic() < ends:
            started = time.perf_counter()
            answer = protocol.ModelInferResponse.FromString(call(payload, metadata=(("x-tenant-id", "b"),)))
            total = (time.perf_counter() - started) * 1e3
            said = answer.parameters
            rows.append((total, said[QUEUE_PARAMETER].int64_param / 1e3, said[COMPUTE_PARAMETER].int64_param / 1e3))
            time.sleep(PROBE_GAP)
    found["probes"] = rows


def percentiles(rows: list[tuple[float, float, float]]) -> dict[str, tuple[float, float, float]]:
    """p50 and p99 of B's probes, ranked by whole latency: (total, queue, compute) ms."""
    ranked = sorted(rows)
    return {
        name: ranked[min(len(ranked) - 1, len(ranked) * share // 100)] for name, share in (("p50", 50), ("p99", 99))
    }


def measure(repository: Path, model: str, seconds: float, limits: Path | None) -> dict:
    flags = ("--trust-tenant-header", *(("--tenant-limits", str(limits)) if limits else ()))
    server = start_server(repository, *flags)
    try:
        capacity = report(loadgen(server.url, model, "probe", "--concurrency", "64", seconds=seconds))
        rate = max(1.0, SHARE * capacity["requests_per_second"])
        light = ("--rate", f"{rate:.0f}", "--arrivals", "poisson")
        alone, alone_probes = report(loadgen(server.url, model, "b", *light, seconds=seconds)), {}
        breakdown(server.url, model, alone_probes, seconds)
        flood = loadgen(server.url, model, "a", "--concurrency", str(FLOOD_CALLERS), seconds=2 * seconds + 4)
        under = report(loadgen(server.url, model, "b", *light, seconds=seconds))
        under_probes = {}  # while A still floods, B's light load over
        breakdown(server.url, model, under_probes, seconds)
        flooded = report(flood)
    finally:
        server.stop()
    return {
        "model": model,
        "capacity": capacity,
        "rate": rate,
        "alone": alone,
        "under_flood": under,
        "flood": flooded,
        "probes": {"alone": percentiles(alone_probes["probes"]), "under_flood": percentiles(under_probes["probes"])},
    }


def print_table(found: dict) -> None:
    capacity = found["capacity"]["requests_per_second"]
    print(
        f"capacity (c=64): {capacity:,.0f} requests/s; B at {found['rate']:,.0f}/s ({SHARE:.0%}), A: {FLOOD_CALLERS} callers"
    )
    print("                    B p50 ms   B p99 ms   B errors   A answered/s   A errors")
    alone, under, flood = found["alone"], found["under_flood"], found["flood"]
    print(f"B alone            {alone['p50_ms']:9.2f}  {alone['p99_ms']:9.2f}  {alone['errors']:9}")
    print(
        f"B under A's flood  {under['p50_ms']:9.2f}  {under['p99_ms']:9.2f}  {under['errors']:9}"
        f"  {flood['requests_per_second']:13,.0f}  {flood['errors']:9}"
    )
    print("B one at a time              total ms   in our queue   compute   before/after (transport)")
    for when, ranks in found["probes"].items():
        for rank, (total, queue, compute) in ranks.items():
            rest = total - queue - compute
            print(f"  {when:11} {rank}           {total:9.2f}  {queue:13.2f}  {compute:8.2f}  {rest:10.2f}")


def targets(found: dict) -> list[tuple[str, str, bool]]:
    alone, under = found["alone"], found["under_flood"]
    ratio = under["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("inf")
    return [
        (f"{found['model']}: B's p99 under A's flood <= {TARGET}x alone", f"{ratio:.1f}x", ratio <= TARGET),
        ("no request of B's refused", f"{under['errors']} refused", under["errors"] == 0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fair_share", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--limits", type=Path, help="a --tenant-limits file to serve with")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxserve-fair-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, args.models)
        found = [measure(repository, model, args.duration, args.limits) for model in args.models]
    for each in found:
        print_table(each)
        print_targets(targets(each))
    return 0


if __name__ == "__main__":
    sys.exit(main())
