"""What tracing costs: the benchmark MLP at 64 unary callers, default settings, with tracing off (no
endpoint), sampling 1% and 100% into a real OTLP receiver (bench/otlp_receiver.py) over gRPC,
interleaved in rounds; throughput and the server's CPU per request against tracing off.

    python -m bench.traces [--duration 5] [--rounds 3]

Targets: 1% within 5% of off; 100% measured and reported."""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import make_models, print_targets
from bench.otlp_receiver import OtlpReceiver
from bench.serving import start_server
from bench.shm import point

MODEL, CONCURRENCY = "mlp", 64
SETTINGS = {"off": None, "1%": "0.01", "100%": "1.0"}  # OTEL_TRACES_SAMPLER_ARG, where traced
TARGET = 0.95  # 1% against off, at least


def environment(receiver: OtlpReceiver, share: str | None) -> dict[str, str] | None:
    if share is None:
        return None
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": share,
    }


def measure(repository: Path, seconds: float, rounds: int) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with OtlpReceiver("grpc").start() as receiver:
        for round_number in range(rounds):  # each setting a server of its own, in turn, the order
            order = list(SETTINGS.items())  # reversed every other round: drift weighs on all alike
            for name, share in order if round_number % 2 == 0 else order[::-1]:
                server = start_server(repository, environment=environment(receiver, share))
                try:
                    found[name].append(point(server.url, server.process.pid, MODEL, CONCURRENCY, seconds, False))
                finally:
                    server.stop()
        found["spans_received"] = [{"spans": len(receiver.spans())}]
    return found


def print_table(found: dict[str, list[dict]]) -> None:
    print()
    print(f"{MODEL} c={CONCURRENCY} unary   inf/s    p50 ms  server CPU us/req  vs off  errors")
    base = statistics.median(report["inferences_per_second"] for report in found["off"])
    for name in SETTINGS:
        reports = found[name]
        rate = statistics.median(report["inferences_per_second"] for report in reports)
        p50 = statistics.median(report["p50_ms"] for report in reports)
        cpu = statistics.median(report["server_cpu_per_request_us"] for report in reports)
        errors = sum(report["errors"] for report in reports)
        print(f"tracing {name:5}       {rate:7,.0f}  {p50:8.2f}  {cpu:17,.0f}  {rate / base:6.2f}  {errors:6}")
    print(f"spans received: {found['spans_received'][0]['spans']:,}")


def targets(found: dict[str, list[dict]]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) of tracing's cost."""
    off, one, every = (
        statistics.median(report["inferences_per_second"] for report in found[name]) for name in SETTINGS
    )
    return [
        (f"tracing 1% within 5% of off ({MODEL} c={CONCURRENCY} unary)", f"{one / off:.2f}x", one / off >= TARGET),
        ("tracing 100%: measured, reported", f"{every / off:.2f}x of off", True),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traces", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxserve-traces-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, [MODEL])
        found = measure(repository, args.duration, args.rounds)
    print_table(found)
    print_targets(targets(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
