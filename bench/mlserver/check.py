"""End-to-end check of the MLServer peer with NVIDIA's tritonclient (not part of the benchmark).

    /tmp/venv/bin/python bench/mlserver/check.py [--parallel-workers 0] [--max-batch-size 64]
        [--max-batch-time 0.001] [--threads 2] [--count-batches] [--seconds 5] [--calls 300]

Needs onnx, numpy and tritonclient[grpc] in the running Python (onnxserve's dev environment),
and bench/.venv-mlserver (bench/mlserver/setup.sh) for MLServer itself. Builds a tiny model
(x FP32 [batch, 4] -> Gemm with a fixed 4x3 W and bias -> y FP32 [batch, 3]; opset 17, IR 9),
starts MLServer on it with bench/mlserver/serve.py, then:

1. one tritonclient.grpc (sync) call, checked against numpy;
2. 32 concurrent tritonclient.grpc.aio callers, each with its own x, every answer checked;
   with --count-batches, how many rows each predict() call got (adaptive batching at work:
   MLServer 1.7.1 has no batch-size metric of its own on /metrics);
3. p50/p90/p99 latency of ~300 sequential calls (concurrency 1);
4. throughput of 64 closed-loop callers over --seconds.

Prints one JSON object at the end. Exit status 1 if an answer is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script
from bench.mlserver import serve  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10  # 4x3
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def tiny_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses: pin IR 9.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def expected(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def infer_input(module, x: np.ndarray):
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # sent as raw_input_contents, so MLServer answers raw too
    return tensor


def sync_check(url: str, name: str) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    metadata = client.get_model_metadata(name, as_json=True)
    x = np.array([[1, 2, 3, 4], [-1, 0, 0.5, 2]], dtype=np.float32)
    result = client.infer(name, [infer_input(grpcclient, x)])
    y = result.as_numpy("y")
    client.close()
    ok = y is not None and y.dtype == np.float32 and y.shape == (2, 3) and np.allclose(y, expected(x), atol=1e-5)
    return {
        "ok": bool(ok),
        "x": x.tolist(),
        "y": None if y is None else y.tolist(),
        "expected": expected(x).tolist(),
        "metadata": metadata,
    }


async def concurrent_check(url: str, name: str, callers: int, rounds: int) -> dict:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    rng = np.random.default_rng(1)
    wrong, latencies = 0, []

    async def caller(i: int) -> None:
        nonlocal wrong
        for _ in range(rounds):
            x = rng.random((1 + i % 3, 4), dtype=np.float32)  # mixed minibatch sizes 1..3
            begin = time.perf_counter()
            result = await client.infer(name, [infer_input(aioclient, x)])
            latencies.append(time.perf_counter() - begin)
            y = result.as_numpy("y")
            if y is None or y.shape != (x.shape[0], 3) or not np.allclose(y, expected(x), atol=1e-5):
                wrong += 1

    begin = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - begin
    await client.close()
    return {
        "callers": callers,
        "requests": callers * rounds,
        "wrong": wrong,
        "seconds": elapsed,
        "p50_ms": 1e3 * float(np.median(latencies)),
    }


async def sequential_latency(url: str, name: str, calls: int) -> dict:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    inputs = [infer_input(aioclient, np.ones((1, 4), np.float32))]
    for _ in range(20):  # warm: channel, MLServer's first-call paths
        await client.infer(name, inputs)
    latencies = []
    for _ in range(calls):
        begin = time.perf_counter()
        await client.infer(name, inputs)
        latencies.append(time.perf_counter() - begin)
    await client.close()
    ms = 1e3 * np.array(latencies)
    return {
        "calls": calls,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


async def throughput(url: str, name: str, concurrency: int, seconds: float) -> dict:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    inputs = [infer_input(aioclient, np.ones((1, 4), np.float32))]
    await asyncio.gather(*(client.infer(name, inputs) for _ in range(concurrency)))  # warm
    latencies, errors = [], 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            begin = time.perf_counter()
            try:
                await client.infer(name, inputs)
                latencies.append(time.perf_counter() - begin)
            except Exception:  # noqa: BLE001 - counted, not fatal
                errors += 1

    begin = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - begin
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await client.close()
    ms = 1e3 * np.array(latencies)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "client_cpu_fraction": client_cpu / elapsed,
    }


def batch_histogram(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = [int(line) for line in path.read_text().split()]
    path.write_text("")
    counts: dict[int, int] = {}
    for r in rows:
        counts[r] = counts.get(r, 0) + 1
    return {
        "predict_calls": len(rows),
        "rows": sum(rows),
        "mean_rows": sum(rows) / len(rows) if rows else 0,
        "max_rows": max(rows) if rows else 0,
        "rows_per_call": dict(sorted(counts.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel-workers", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-time", type=float, default=0.001)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--count-batches", action="store_true", help="use counting_runtime.CountingOnnxRuntime")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--skip-perf", action="store_true")
    args = parser.parse_args(argv)

    report: dict = {"settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="mlserver-check-") as scratch:
        scratch = Path(scratch)
        model = tiny_model(scratch / "model.onnx")
        counts = scratch / "batches.txt"
        implementation = "counting_runtime.CountingOnnxRuntime" if args.count_batches else serve.IMPLEMENTATION
        os.environ["COUNT_BATCHES_FILE"] = str(counts)
        begin = time.perf_counter()
        handle = serve.start(
            model,
            "tiny",
            serve.free_port(),
            serve.free_port(),
            args.max_batch_size,
            args.max_batch_time,
            scratch / "mls",
            parallel_workers=args.parallel_workers,
            threads=args.threads,
            implementation=implementation,
        )
        report["startup_seconds"] = time.perf_counter() - begin
        try:
            report["sync"] = sync_check(handle.grpc_url, "tiny")
            batch_histogram(counts)
            report["concurrent32"] = asyncio.run(concurrent_check(handle.grpc_url, "tiny", 32, 20))
            report["concurrent32"]["batches"] = batch_histogram(counts)
            if not args.skip_perf:
                report["latency_c1"] = asyncio.run(sequential_latency(handle.grpc_url, "tiny", args.calls))
                report["latency_c1"]["batches"] = batch_histogram(counts)
                report["throughput"] = asyncio.run(throughput(handle.grpc_url, "tiny", args.concurrency, args.seconds))
                report["throughput"]["batches"] = batch_histogram(counts)
        finally:
            report["stop_returncode"] = handle.stop()
            log = handle.log()
            report["log_head"] = log.splitlines()[:15]
            report["log_errors"] = [line for line in log.splitlines() if "rror" in line or "Traceback" in line][:10]
    print(json.dumps(report, indent=2))
    ok = report["sync"]["ok"] and report["concurrent32"]["wrong"] == 0
    print("OK" if ok else "WRONG ANSWERS", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
