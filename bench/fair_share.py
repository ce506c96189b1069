"""Fair share under overload, measured: tenant B sends 10% of the server's capacity (open loop,
Poisson arrivals) alone, then again while tenant A floods it (closed loop, 256 callers, far past
capacity); B's p99 and refusals in both, on the benchmark MLP at default settings, the tenants
named by the x-tenant-id header (--trust-tenant-header).

    python -m bench.fair_share [--duration 10] [--limits FILE]

Target (the tenant limits' fair share): B's p99 under A's flood within 2x its p99 alone, and no
request of B's refused. `--limits` serves a --tenant-limits file (weights, rates, in-flight caps)."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import make_models
from bench.serving import ROOT, start_server

MODELS = ("mlp", "resnet50")  # the MLP: the transport is the work; ResNet-50: the model is
FLOOD_CALLERS, SHARE = 256, 0.10
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


def measure(repository: Path, model: str, seconds: float, limits: Path | None) -> dict:
    flags = ("--trust-tenant-header", *(("--tenant-limits", str(limits)) if limits else ()))
    server = start_server(repository, *flags)
    try:
        capacity = report(loadgen(server.url, model, "probe", "--concurrency", "64", seconds=seconds))
        rate = max(1.0, SHARE * capacity["requests_per_second"])
        light = ("--rate", f"{rate:.0f}", "--arrivals", "poisson")
        alone = report(loadgen(server.url, model, "b", *light, seconds=seconds))
        flood = loadgen(server.url, model, "a", "--concurrency", str(FLOOD_CALLERS), seconds=seconds + 2)
        under = report(loadgen(server.url, model, "b", *light, seconds=seconds))
        flooded = report(flood)
    finally:
        server.stop()
    return {"model": model, "capacity": capacity, "rate": rate, "alone": alone, "under_flood": under, "flood": flooded}


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
        for target, value, met in targets(each):
            print(f"  {'met    ' if met else 'NOT met'}  {target}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
