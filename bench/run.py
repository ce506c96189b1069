"""The side-by-side benchmark, in one run on one machine, every server on its default settings:

    python -m bench.run                       # every model, 5 s per point
    python -m bench.run --models mlp --duration 10 --soak 100000

For each benchmark model (bench/make_models.py; the repository has no config.pbtxt, so onnxserve
serves each with the defaults a new user gets) it measures, at concurrency 1, 8 and 64 (16 for
ResNet-50), each server as one ModelInfer call per request ("unary"), over ModelStreamInfer
with one stream per caller ("stream"), and as one REST POST per request with Triton's binary
tensor data ("rest-bin") or with tensors as JSON lists ("rest-json"), where the server has REST:

- raw onnxruntime in-process with the server's session options at its best batch size (the
  model's limit);
- onnxserve;
- echo: a bare grpc.aio server answering with prebuilt bytes (bench/echo.py), the floor of any
  Python gRPC server on this machine;
- Seldon MLServer through a plain custom runtime with adaptive batching (bench/mlserver);
- NVIDIA Triton's C++ front end and dynamic batcher through PyTriton (bench/pytriton).

Each row has throughput, p50, errors and the server's CPU per request (its whole process
tree, from /proc). Then the ratios, and the targets of the "fast by default" work as measured.
ResNet-50 also as "unary-shm": onnxserve with each caller's tensors in Triton's system shared memory
(bench/shm_regions.py). With the MLP, also onnxserve with 1 and 2 front-end processes (bench/split.py): throughput and
CPU per request of the engine and of the front ends, at 64 callers; and tracing off, 1% and 100% into
a real OTLP receiver (bench/traces.py).
Figures from one run only: these machines are noisy, so compare ratios, not absolute numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import echo, make_models, print_targets
from bench.peer_ready import free_port
from bench.serving import start_server
from server.engine.cpus import cpu_cores

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    model: str
    concurrencies: tuple[int, ...]
    raw_batches: tuple[int, ...]
    shapes: tuple[str, ...] = ()  # loadgen --shape arguments (batch 1)
    shared_memory: bool = False  # also measured with its tensors in system shared memory ("unary-shm")


WORKLOADS = {
    "mlp": Workload("mlp", (1, 8, 64), (1, 8, 32)),
    "resnet50": Workload("resnet50", (1, 16), (1, 2, 4), shared_memory=True),
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
    return {
        "best_batch": best,
        "best_inferences_per_second": results[best]["inferences_per_second"],
        "batch1_latency_ms": results[workload.raw_batches[0]]["latency_ms"],
        "by_batch": results,
    }


TRANSPORTS = ("unary", "stream", "rest-bin", "rest-json", "unary-shm")
PEER_MAX_BATCH = 32  # rows per batch for the peers' batchers: onnxserve's default max_batch_size
PEERS = ("echo", "mlserver", "pytriton")
LABELS = {"onnxserve": "onnxserve", "echo": "echo floor", "mlserver": "MLServer", "pytriton": "PyTriton"}


@dataclass
class Running:
    """A server under test: where to call it, its process (for CPU), how it answers streams."""

    url: str
    pid: int
    stop: Callable[[], object]
    metrics_url: str | None = None
    in_order: bool = False  # stream answers in order, without the request's id
    http_url: str | None = None  # REST host:port, where the server has REST
    serves_regions: bool = False  # Triton's system shared memory (bench/shm_regions.py)


def loadgen(
    running: Running, workload: Workload, concurrency: int, seconds: float, requests: int = 0, transport: str = "unary"
) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        running.url,
        "--model",
        workload.model,
        "--json",
        "--concurrency",
        str(concurrency),
        "--duration",
        str(seconds),
        "--server-pid",
        str(running.pid),
    ]
    if transport == "stream":
        command += ["--streams", str(concurrency)] + (["--stream-protocol", "mlserver"] if running.in_order else [])
    if transport == "unary-shm":
        command += ["--shared-memory"]
    if transport.startswith("rest"):
        command += ["--http-url", running.http_url, "--http-body", "binary" if transport == "rest-bin" else "json"]
    command += [arg for shape in workload.shapes for arg in ("--shape", shape)]
    if running.metrics_url:
        command += ["--metrics-url", running.metrics_url]
    if requests:
        command += ["--requests", str(requests), "--progress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if not result.stdout.strip():
        raise RuntimeError(f"load generator failed:\n{result.stderr}")
    return json.loads(result.stdout)


def every_point(running: Running, workload: Workload, seconds: float) -> dict:
    """{transport: {concurrency: loadgen report}} for one running server."""
    transports = [t for t in TRANSPORTS if running.http_url or not t.startswith("rest")]
    if not (workload.shared_memory and running.serves_regions):
        transports = [t for t in transports if t != "unary-shm"]
    results: dict = {}
    for transport in transports:
        for concurrency in workload.concurrencies:
            try:
                results.setdefault(transport, {})[concurrency] = loadgen(
                    running, workload, concurrency, seconds, transport=transport
                )
            except RuntimeError as err:  # the server died: keep what was measured, say where it stopped
                print(f"  stopped at {transport} c={concurrency}: {str(err)[-600:]}", file=sys.stderr)
                results["died_at"] = f"{transport} c={concurrency}"
                return results
    return results


def start_onnxserve(repository: Path, model_path: Path, workdir: Path, root: Path = ROOT, flags=()) -> Running:
    server = start_server(repository, *flags, root=root)
    metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
    return Running(server.url, server.process.pid, server.stop, metrics, http_url=server.http_url, serves_regions=True)


def start_echo(repository: Path, model_path: Path, workdir: Path) -> Running:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", str(model_path), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stderr.readline()
    if echo.READY not in line:
        process.kill()
        raise RuntimeError(f"the echo server did not start: {line}{process.stderr.read()}")
    process.stderr.close()

    def stop() -> None:
        process.terminate()
        process.wait(10)

    return Running(f"127.0.0.1:{line.split()[-1]}", process.pid, stop, in_order=True)


def start_mlserver(repository: Path, model_path: Path, workdir: Path) -> Running:
    from bench.mlserver import serve

    grpc_port, http_port = free_port(), free_port()
    handle = serve.start(
        model_path, model_path.parent.parent.name, grpc_port, http_port, PEER_MAX_BATCH, 0.001, workdir
    )
    return Running(
        f"127.0.0.1:{grpc_port}", handle.process.pid, handle.stop, in_order=True, http_url=f"127.0.0.1:{http_port}"
    )


def start_pytriton(repository: Path, model_path: Path, workdir: Path) -> Running:
    from bench.pytriton import serve

    grpc_port, http_port = free_port(), free_port()
    handle = serve.start(model_path, model_path.parent.parent.name, grpc_port, http_port, PEER_MAX_BATCH, workdir)
    return Running(f"127.0.0.1:{grpc_port}", handle.process.pid, handle.stop, http_url=f"127.0.0.1:{http_port}")


STARTERS = {"onnxserve": start_onnxserve, "echo": start_echo, "mlserver": start_mlserver, "pytriton": start_pytriton}
SETUPS = {"mlserver": ROOT / "bench" / "mlserver" / "setup.sh", "pytriton": ROOT / "bench" / "pytriton" / "setup.sh"}


def measure(server: str, repository: Path, workload: Workload, seconds: float, workdir: Path) -> dict:
    running = STARTERS[server](repository, repository / workload.model / "1" / "model.onnx", workdir)
    try:
        return every_point(running, workload, seconds)
    finally:
        running.stop()


def soak(repository: Path, requests: int) -> dict:
    """RSS of the server before and after `requests` mlp requests at concurrency 64."""
    server = start_server(repository)
    try:
        workload, running = WORKLOADS["mlp"], Running(server.url, server.process.pid, server.stop)
        loadgen(running, workload, 64, 5)  # warm: pools, caches, histograms exist
        before = server.samples().get("process_resident_memory_bytes")
        report = loadgen(running, workload, 64, 0, requests=requests)
        after = server.samples().get("process_resident_memory_bytes")
        return {
            "requests": report["requests"],
            "errors": report["errors"],
            "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
        }
    finally:
        server.stop()


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_table(results: dict) -> None:
    print()
    print("model     conc call      server        inf/s    p50 ms  server CPU us/req  batch  errors")
    for model, figures in results.items():
        for concurrency, transport in ((c, t) for c in WORKLOADS[model].concurrencies for t in TRANSPORTS):
            for server in ("onnxserve", *PEERS):
                point = figures.get(server, {}).get(transport, {}).get(concurrency)
                if point is None:
                    if figures.get(server, {}).get("died_at") == f"{transport} c={concurrency}":
                        print(
                            f"{model:9} {concurrency:4} {transport:9} {LABELS[server]:10} {'the server died here':>30}"
                        )
                    continue
                cpu, batch = point.get("server_cpu_per_request_us"), point.get("server_average_batch")
                cpu = cpu if cpu and cpu > 0 else None  # a server that died mid-run took its CPU figures along
                print(
                    f"{model:9} {concurrency:4} {transport:9} {LABELS[server]:10} {point['inferences_per_second']:10,.0f}"
                    f" {point['p50_ms']:9.3f} {f'{cpu:,.0f}' if cpu else '-':>18} {f'{batch:.1f}' if batch else '-':>6}"
                    f" {point['errors']:7}"
                )
    print()
    print(
        "model     conc call      raw best (batch) | onnxserve / raw  / echo  / MLServer  / PyTriton | p50 / echo p50"
    )
    for model, figures in results.items():
        raw = figures["raw"]
        for concurrency, transport in ((c, t) for c in WORKLOADS[model].concurrencies for t in TRANSPORTS):
            rate = {
                s: figures.get(s, {}).get(transport, {}).get(concurrency, {}).get("inferences_per_second")
                for s in ("onnxserve", *PEERS)
            }
            p50 = {
                s: figures.get(s, {}).get(transport, {}).get(concurrency, {}).get("p50_ms")
                for s in ("onnxserve", "echo")
            }
            if rate["onnxserve"] is None:
                continue  # not measured for this model (unary-shm: ResNet-50 only)
            print(
                f"{model:9} {concurrency:4} {transport:9} {raw['best_inferences_per_second']:9,.0f} ({raw['best_batch']:3})    |"
                f" {ratio(rate['onnxserve'], raw['best_inferences_per_second']):>15} {ratio(rate['onnxserve'], rate['echo']):>6}"
                f" {ratio(rate['onnxserve'], rate['mlserver']):>10} {ratio(rate['onnxserve'], rate['pytriton']):>10} |"
                f" {ratio(p50['onnxserve'], p50['echo']):>14}"
            )
    print()


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of the fast-by-default work this run can judge."""

    def point(model, server, transport, concurrency):
        return results.get(model, {}).get(server, {}).get(transport, {}).get(concurrency)

    found = []
    mlp = results.get("mlp")
    if mlp:
        ours, echo_ = point("mlp", "onnxserve", "unary", 64), point("mlp", "echo", "unary", 64)
        peers = [p["inferences_per_second"] for s in ("mlserver", "pytriton") if (p := point("mlp", s, "unary", 64))]
        if peers:
            value = ours["inferences_per_second"] / max(peers)
            found.append(("MLP c=64 unary: >= 1.5x the best peer", f"{value:.2f}x", value >= 1.5))
        if echo_:
            value = ours["inferences_per_second"] / echo_["inferences_per_second"]
            found.append(("MLP c=64 unary: >= 0.8x the echo floor", f"{value:.2f}x", value >= 0.8))
            single, floor = point("mlp", "onnxserve", "unary", 1), point("mlp", "echo", "unary", 1)
            value = single["p50_ms"] / floor["p50_ms"]
            found.append(
                (
                    "MLP c=1 unary: p50 <= 1.5x the echo floor's",
                    f"{single['p50_ms']:.3f} ms, {value:.2f}x",
                    value <= 1.5,
                )
            )
            streams, floor = point("mlp", "onnxserve", "stream", 64), point("mlp", "echo", "stream", 64)
            value = streams["inferences_per_second"] / floor["inferences_per_second"]
            found.append(("MLP 64 streams: >= 0.8x a bare streaming echo", f"{value:.2f}x", value >= 0.8))
        rest = point("mlp", "onnxserve", "rest-bin", 64)
        if rest:
            value = rest["inferences_per_second"] / ours["inferences_per_second"]
            found.append(("MLP c=64 binary REST: >= 0.8x our own gRPC unary", f"{value:.2f}x", value >= 0.8))
    for model in ("resnet50",):
        if model in results:
            best = results[model]["raw"]["best_inferences_per_second"]
            for transport in TRANSPORTS:
                if (measured := point(model, "onnxserve", transport, 16)) is None:
                    continue
                value = measured["inferences_per_second"] / best
                found.append(
                    (f"ResNet-50 c=16 {transport}: >= 0.9 of raw onnxruntime's best", f"{value:.2f}", value >= 0.9)
                )
            plain, shared = point(model, "onnxserve", "unary", 16), point(model, "onnxserve", "unary-shm", 16)
            if plain and shared:
                value = plain["server_cpu_per_request_us"] / shared["server_cpu_per_request_us"]
                outside = plain["server_cpu_outside_onnxruntime_us"] / shared["server_cpu_outside_onnxruntime_us"]
                found.append(
                    (
                        "ResNet-50 c=16: >= 1.3x fewer server CPU us/request in shared memory than unary",
                        f"{outside:.2f}x outside onnxruntime; {value:.2f}x with it, where the CPU's compute hides it",
                        outside >= 1.3,
                    )
                )
    errors = sum(
        p["errors"]
        for m in results.values()
        for t in m.get("onnxserve", {}).values()
        if isinstance(t, dict)
        for p in t.values()
    )
    found.append(("onnxserve: 0 errors at every point", str(errors), errors == 0))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument(
        "--peers",
        nargs="*",
        default=list(PEERS),
        choices=list(PEERS),
        help="which baselines to run beside onnxserve (default: all)",
    )
    parser.add_argument("--soak", type=int, default=0, help="also: RSS before/after this many mlp requests")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    for peer in args.peers:
        if peer in SETUPS:  # each peer lives in its own venv; set-up is idempotent and quick once done
            subprocess.run(["bash", str(SETUPS[peer])], check=True, stdout=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxserve-bench-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, args.models)
        for name in args.models:
            workload, model_path = WORKLOADS[name], repository / name / "1" / "model.onnx"
            print(f"{name}: raw onnxruntime ...", file=sys.stderr)
            results[name] = {"raw": raw_onnxruntime(model_path, workload, args.duration)}
            for server in ("onnxserve", *args.peers):
                print(f"{name}: {LABELS[server]} ...", file=sys.stderr)
                workdir = Path(scratch) / f"{server}-{name}"
                workdir.mkdir()
                results[name][server] = measure(server, repository, workload, args.duration, workdir)
        if "mlp" in args.models:
            from bench import split, traces  # here: they build on this module

            print("mlp: onnxserve with 1 and 2 front-end processes ...", file=sys.stderr)
            results["split"] = split.measure(repository, args.duration)
            print("mlp: onnxserve tracing off, 1% and 100% ...", file=sys.stderr)
            results["traces"] = traces.measure(repository, args.duration, rounds=4)
        if args.soak:
            print(f"soak: {args.soak} mlp requests ...", file=sys.stderr)
            results["soak"] = soak(repository, args.soak)
    print(f"machine: {os.cpu_count()} cores visible, {cpu_cores()} usable; onnxruntime {ort.__version__}")
    measured = {k: v for k, v in results.items() if k not in ("soak", "split", "traces")}
    print_table(measured)
    found = targets(measured)
    if "split" in results:
        from bench import split, traces

        split.print_table(results["split"])
        found += split.targets(results["split"])
    if "traces" in results:
        traces.print_table(results["traces"])
        found += traces.targets(results["traces"])
    print("targets (every server on its defaults):")
    print_targets(found)
    if "soak" in results:
        s = results["soak"]
        print(
            f"soak: {s['requests']} requests, {s['errors']} errors; server RSS {s['rss_before_mb']:.1f} MB -> {s['rss_after_mb']:.1f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
