"""The side-by-side benchmark, in one run on one machine:

    python -m bench.run                       # every model, 5 s per point
    python -m bench.run --models mlp --duration 10 --soak 100000

For each benchmark model (bench/make_models.py): raw onnxruntime in-process with the
server's session options at its best batch size (the physical limit), onnxserve at
concurrency 1, 8 and 64 (16 for ResNet-50), and Seldon MLServer serving the same file
through a plain custom runtime with adaptive batching (bench/mlserver, its own venv).
onnxserve is measured twice at each point: one ModelInfer call per request ("unary"), and
over ModelStreamInfer with one stream per caller ("stream", Triton's streaming API, which
saves gRPC's per-call cost). MLServer is measured the same two ways, each compared with the
same transport. Prints a table of ratios: onnxserve / raw and onnxserve / MLServer. Figures from one run
only: these machines are noisy, so compare ratios, not absolute numbers, between runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import make_models
from server.runtime import cpu_cores
from tests.conftest import start_server
from tests.prometheus import free_port

ROOT = Path(__file__).resolve().parent.parent
MLSERVER_VENV = ROOT / "bench" / ".venv-mlserver"


@dataclass(frozen=True)
class Workload:
    model: str
    concurrencies: tuple[int, ...]
    raw_batches: tuple[int, ...]
    shapes: tuple[str, ...] = ()  # loadgen --shape arguments (batch 1)
    mlserver_batch: int = 16


WORKLOADS = {
    "mlp": Workload("mlp", (1, 8, 64), (1, 8, 32, 64), mlserver_batch=64),
    "resnet50": Workload("resnet50", (1, 16), (1, 2, 4)),
    "encoder": Workload("encoder", (1, 8), (1, 4, 8), ("input_ids=1,128", "attention_mask=1,128")),
}


def raw_feeds(session: ort.InferenceSession, batch: int, shapes: tuple[str, ...]) -> dict:
    fixed = {name: [int(d) for d in dims.split(",")] for name, dims in (s.split("=") for s in shapes)}
    rng, feeds = np.random.default_rng(0), {}
    for arg in session.get_inputs():
        shape = fixed.get(arg.name, [d if isinstance(d, int) else 1 for d in arg.shape])
        shape = [batch, *shape[1:]]
        if "int64" in arg.type:
            feeds[arg.name] = np.ones(shape, np.int64) if arg.name == "attention_mask" else rng.integers(0, 1000, shape)
        else:
            feeds[arg.name] = rng.random(shape, dtype=np.float32)
    return feeds


def raw_onnxruntime(model_path: Path, workload: Workload, seconds: float) -> dict:
    """Best throughput over batch sizes, with onnxserve's own session options."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = cpu_cores()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    results = {}
    for batch in workload.raw_batches:
        feeds = raw_feeds(session, batch, workload.shapes)
        session.run(None, feeds)
        timings, deadline = [], time.perf_counter() + seconds / len(workload.raw_batches)
        while time.perf_counter() < deadline or len(timings) < 3:
            begin = time.perf_counter()
            session.run(None, feeds)
            timings.append(time.perf_counter() - begin)
        median = float(np.median(timings))
        results[batch] = {"latency_ms": median * 1e3, "inferences_per_second": batch / median}
    best = max(results, key=lambda b: results[b]["inferences_per_second"])
    return {"best_batch": best, "best_inferences_per_second": results[best]["inferences_per_second"],
            "batch1_latency_ms": results[workload.raw_batches[0]]["latency_ms"], "by_batch": results}  # fmt: skip


TRANSPORTS = ("unary", "stream")


def loadgen(url: str, workload: Workload, concurrency: int, seconds: float, metrics_url: str | None = None,
            requests: int = 0, transport: str = "unary", peer: bool = False) -> dict:  # fmt: skip
    command = [sys.executable, "-m", "bench.loadgen", "--url", url, "--model", workload.model, "--json",
               "--concurrency", str(concurrency), "--duration", str(seconds)]  # fmt: skip
    if transport == "stream":
        command += ["--streams", str(concurrency)] + (["--stream-protocol", "mlserver"] if peer else [])
    command += [arg for shape in workload.shapes for arg in ("--shape", shape)]
    if metrics_url:
        command += ["--metrics-url", metrics_url]
    if requests:
        command += ["--requests", str(requests), "--progress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if not result.stdout.strip():
        raise RuntimeError(f"load generator failed:\n{result.stderr}")
    return json.loads(result.stdout)


def mlserver_available() -> bool:
    return (MLSERVER_VENV / "bin" / "mlserver").exists()


def every_point(url: str, workload: Workload, seconds: float, metrics_url: str | None = None, peer: bool = False) -> dict:
    """{transport: {concurrency: loadgen report}} for one running server."""
    return {
        transport: {c: loadgen(url, workload, c, seconds, metrics_url, transport=transport, peer=peer) for c in workload.concurrencies}
        for transport in TRANSPORTS
    }


def run_onnxserve(repository: Path, workload: Workload, seconds: float) -> dict:
    server = start_server(repository)
    try:
        return every_point(server.url, workload, seconds, f"http://127.0.0.1:{server.metrics_port}/metrics")
    finally:
        server.stop()


def run_mlserver(model_path: Path, workload: Workload, seconds: float, workdir: Path) -> dict:
    from bench.mlserver import serve

    grpc_port, http_port = free_port(), free_port()
    handle = serve.start(model_path, workload.model, grpc_port, http_port, workload.mlserver_batch, 0.001, workdir)
    try:
        return every_point(f"127.0.0.1:{grpc_port}", workload, seconds, peer=True)
    finally:
        handle.stop()


def soak(repository: Path, requests: int) -> dict:
    """RSS of the server before and after `requests` mlp requests at concurrency 64."""
    server = start_server(repository)
    try:
        workload = WORKLOADS["mlp"]
        loadgen(server.url, workload, 64, 5)  # warm: pools, caches, histograms exist
        before = server.samples().get("process_resident_memory_bytes")
        report = loadgen(server.url, workload, 64, 0, requests=requests)
        after = server.samples().get("process_resident_memory_bytes")
        return {"requests": report["requests"], "errors": report["errors"], "rss_before_mb": before / 2**20,
                "rss_after_mb": after / 2**20}  # fmt: skip
    finally:
        server.stop()


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_table(results: dict) -> None:
    print()
    print("model     conc onnxserve | raw best inf/s (batch) | onnxserve inf/s  p50 ms | MLServer inf/s  p50 ms |"
          " onnxserve/raw  onnxserve/MLServer (inf/s)  MLServer/onnxserve (p50) | errors")  # fmt: skip
    for model, figures in results.items():
        raw = figures["raw"]
        for concurrency, transport in ((c, t) for c in WORKLOADS[model].concurrencies for t in TRANSPORTS):
            ours = figures["onnxserve"][transport][concurrency]
            peer = figures.get("mlserver", {}).get(transport, {}).get(concurrency)
            peer_rate = peer["inferences_per_second"] if peer else None
            peer_p50 = peer["p50_ms"] if peer else None
            print(
                f"{model:9} {concurrency:4} {transport:9} | {raw['best_inferences_per_second']:12,.0f} ({raw['best_batch']:3})     |"
                f" {ours['inferences_per_second']:12,.0f} {ours['p50_ms']:7.3f} |"
                f" {peer_rate or 0:12,.0f} {peer_p50 or 0:7.3f} |"
                f" {ratio(ours['inferences_per_second'], raw['best_inferences_per_second']):>13}"
                f" {ratio(ours['inferences_per_second'], peer_rate):>19}"
                f" {ratio(peer_p50, ours['p50_ms']):>25} |"
                f" {ours['errors'] + (peer['errors'] if peer else 0):6}"
            )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--no-mlserver", action="store_true", help="skip the peer")
    parser.add_argument("--soak", type=int, default=0, help="also: RSS before/after this many mlp requests")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    if not args.no_mlserver and not mlserver_available():
        print("installing MLServer in its own environment (bench/.venv-mlserver) ...", file=sys.stderr)
        subprocess.run(["bash", str(ROOT / "bench" / "mlserver" / "setup.sh")], check=True)
    use_peer = not args.no_mlserver
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxserve-bench-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, args.models)
        for name in args.models:
            workload, model_path = WORKLOADS[name], repository / name / "1" / "model.onnx"
            print(f"{name}: raw onnxruntime ...", file=sys.stderr)
            results[name] = {"raw": raw_onnxruntime(model_path, workload, args.duration)}
            print(f"{name}: onnxserve ...", file=sys.stderr)
            results[name]["onnxserve"] = run_onnxserve(repository, workload, args.duration)
            if use_peer:
                print(f"{name}: MLServer ...", file=sys.stderr)
                results[name]["mlserver"] = run_mlserver(model_path, workload, args.duration, Path(scratch) / f"mls-{name}")
        if args.soak:
            print(f"soak: {args.soak} mlp requests ...", file=sys.stderr)
            results["soak"] = soak(repository, args.soak)
    print(f"machine: {os.cpu_count()} cores visible, {cpu_cores()} usable; onnxruntime {ort.__version__}")
    print_table({k: v for k, v in results.items() if k != "soak"})
    if "soak" in results:
        s = results["soak"]
        print(f"soak: {s['requests']} requests, {s['errors']} errors; server RSS {s['rss_before_mb']:.1f} MB -> {s['rss_after_mb']:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
