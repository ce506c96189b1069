"""Tensors in Triton's system shared memory against tensors in the gRPC message, on one server at
default settings, interleaved: server CPU per request (its process tree, from /proc; and outside
onnxruntime, less the threads that run it), throughput and p50, at concurrency 1 and 16, on two
models:

    python -m bench.shm [--duration 5] [--rounds 2]

- `wide`: y = x + 1 on 588 KiB a row (ResNet-50's input size), in and out: the transport is all
  the work, so this is what shared memory saves a caller of big tensors;
- `resnet50`: the benchmark model, whose compute on the CPU (about 50 ms of it per request) hides
  what the transport costs in the whole CPU; outside onnxruntime (what a GPU would leave to the
  server's CPU) the saving shows as in `wide`. The target is checked on both figures.
The load generator's `--shared-memory` gives each caller a region of its own (bench/shm_regions.py).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from bench import make_models
from bench.serving import ROOT, start_server

WIDE = 150528  # FP32 values a row: 3 x 224 x 224, ResNet-50's input
CONCURRENCIES = (1, 16)
TARGET = 1.3  # the server's CPU per request over gRPC / in shared memory, at least


def wide_model() -> onnx.ModelProto:
    """y = x + 1, FP32 [batch, WIDE]."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDE])],
        [one],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", make_models.OPSET)], ir_version=make_models.IR_VERSION
    )


def point(url: str, pid: int, model: str, concurrency: int, seconds: float, shared: bool) -> dict:
    command = [sys.executable, "-m", "bench.loadgen", "--url", url, "--model", model, "--json"]
    command += ["--concurrency", str(concurrency), "--duration", str(seconds), "--server-pid", str(pid)]
    done = subprocess.run(command + (["--shared-memory"] if shared else []), cwd=ROOT, capture_output=True, text=True)
    if not done.stdout.strip():
        raise RuntimeError(f"load generator failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout)


def measure(repository: Path, model: str, seconds: float, rounds: int) -> dict:
    server = start_server(repository)
    found: dict = {}
    try:
        for _ in range(rounds):  # interleaved: the machine's drift weighs on both alike
            for concurrency in CONCURRENCIES:
                for shared in (False, True):
                    report = point(server.url, server.process.pid, model, concurrency, seconds, shared)
                    found.setdefault((concurrency, shared), []).append(report)
    finally:
        server.stop()
    return found


def print_point(model: str, concurrency: int, found: dict) -> None:
    cpu, outside = {}, {}
    for shared in (False, True):
        reports = found[(concurrency, shared)]
        cpu[shared] = statistics.median(r["server_cpu_per_request_us"] for r in reports)
        outside[shared] = statistics.median(r["server_cpu_outside_onnxruntime_us"] for r in reports)
        rate = statistics.median(r["inferences_per_second"] for r in reports)
        p50 = statistics.median(r["p50_ms"] for r in reports)
        errors = sum(r["errors"] for r in reports)
        kind = "shm" if shared else "message"
        print(
            f"{model:9} {concurrency:3}  {kind:8} {rate:7,.0f} {p50:8.2f} {cpu[shared]:18,.0f}"
            f" {outside[shared]:20,.0f} {errors:7}"
        )
    for name, figures in (("server CPU", cpu), ("outside onnxruntime", outside)):
        ratio = figures[False] / figures[True]
        verdict = "met" if ratio >= TARGET else "not met"
        print(f"{'':14}{name} per request, message / shm: {ratio:.2f}x (target {TARGET}x: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shm", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print("model      c  tensors   inf/s   p50 ms  server CPU us/req  outside onnxruntime  errors")
    with tempfile.TemporaryDirectory(prefix="onnxserve-shm-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, ["resnet50"])
        (repository / "wide" / "1").mkdir(parents=True)
        (repository / "wide" / "1" / "model.onnx").write_bytes(wide_model().SerializeToString())
        for model in ("wide", "resnet50"):
            found = measure(repository, model, args.duration, args.rounds)
            for concurrency in CONCURRENCIES:
                print_point(model, concurrency, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
