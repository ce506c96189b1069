"""Front-end processes measured: the benchmark MLP at 64 callers over unary gRPC, streams and
binary REST, served by one process (`--frontends 1`) and by two front ends over one engine
(`--frontends 2`), in one run, with the server's CPU per request split by process kind from /proc
(server/tools/loadgen.py): what the engine spends, what the front ends spend. Then the engine
alone at saturation, driven over the link (bench/engine_cost.py), because on a small machine the
front ends cannot keep it busy and its batches stay small.

    python -m bench.split [--duration 5]       # also part of python -m bench.run

One engine keeps up with as many front ends as a front end's CPU per request is a multiple of
the engine's; the target is 8 (the engine at most 1/8 of a front end).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from bench import engine_cost, make_models, print_targets
from bench.run import WORKLOADS, loadgen, start_onnxserve

FRONTENDS = (1, 2)
TRANSPORTS = ("unary", "stream", "rest-bin")
CONCURRENCY = 64
LINK_CONCURRENCY = 512  # requests in flight over the link: enough to keep the engine full
TARGET = 1 / 8


def measure(repository: Path, seconds: float) -> dict:
    """{frontends: {transport: loadgen report}, "saturated": engine over the link}."""
    workload, model_path = WORKLOADS["mlp"], repository / "mlp" / "1" / "model.onnx"
    results: dict = {}
    for count in FRONTENDS:
        running = start_onnxserve(repository, model_path, repository, flags=("--frontends", str(count)))
        try:
            loadgen(running, workload, CONCURRENCY, min(seconds, 2.0))  # warm: pools, caches, every front end
            results[count] = {
                transport: loadgen(running, workload, CONCURRENCY, seconds, transport=transport)
                for transport in TRANSPORTS
            }
        finally:
            running.stop()
    results["saturated"] = engine_cost.engine_over_link(repository, LINK_CONCURRENCY, seconds)
    return results


def print_table(results: dict) -> None:
    print()
    print("MLP c=64     front ends      inf/s   p50 ms  engine us/req  front ends us/req  engine/front end")
    for count in FRONTENDS:
        for transport in TRANSPORTS:
            point = results[count][transport]
            kinds = point.get("server_cpu_by_kind_us") or {}
            engine, front = kinds.get("engine", 0.0), kinds.get("frontend", 0.0)
            share = f"{engine / front:.2f}" if front else "-"
            print(
                f"  {transport:10} {count:10} {point['inferences_per_second']:10,.0f} {point['p50_ms']:8.3f}"
                f" {engine:14,.0f} {front if front else float('nan'):18,.0f} {share:>17}"
            )
    ratios = (
        f"{t} {results[2][t]['inferences_per_second'] / results[1][t]['inferences_per_second']:.2f}x"
        for t in TRANSPORTS
    )
    print(f"  --frontends 2 / --frontends 1: {', '.join(ratios)}")
    saturated = results["saturated"]
    print(
        f"  engine alone, kept full over the link: {saturated['requests_per_second']:,.0f} req/s,"
        f" {saturated['cpu_per_request_us']:.0f} us CPU/req, batches of {saturated['average_batch']:.1f} rows"
    )
    print()


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) of the front-end split."""
    found = []
    front = (results[2]["unary"].get("server_cpu_by_kind_us") or {}).get("frontend")
    if front:
        engine = results["saturated"]["cpu_per_request_us"]
        value = engine / front
        found.append(
            (
                "engine CPU/request (kept full) <= 1/8 of a front end's (c=64 unary)",
                f"{engine:.0f} / {front:.0f} us = {value:.3f}: one engine for {front / engine:.1f} front ends",
                value <= TARGET,
            )
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxserve-split-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, ["mlp"])
        results = measure(repository, args.duration)
    print_table(results)
    print_targets(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
