"""One command that proves the GPU path on a machine with an NVIDIA GPU, and tests its own plumbing
on the CPU (`--cpu`, which CI runs):

    python -m bench.gpu_check --out gpu-check            # on the GPU machine, about 10 minutes
    python -m bench.gpu_check --cpu --seconds 1 --out /tmp/check   # the plumbing, on any machine

For each benchmark model (bench/make_models.py; on the GPU: resnet50 FP32, resnet50 with TensorRT
FP16, encoder; with --cpu: mlp) it:
- reports the provider onnxserve actually runs it on (ModelConfig's execution_provider);
- checks IO binding: the bound run's outputs equal session.run's, and device memory (NVML) does not
  grow over a thousand batches, i.e. no per-batch allocation that is kept;
- measures raw onnxruntime in-process (same provider, best batch size) against onnxserve through
  the load generator at concurrency 1, 16 and 128, and the p50 overhead at concurrency 1;
- reads NVML's energy counter moving under load;
- where TensorRT's libraries load (server.gpu_report), builds an engine into a cache directory,
  restarts, and shows the second load reusing it;
- runs onnxserve-tune on the mlp for 2 minutes (--tune-minutes), so its CUDA and TensorRT FP16
  configurations are loaded and measured with energy per inference (tune.json, tune.txt).
It writes gpu-check.json and gpu-check.md (a table) into --out. Targets on the GPU: at least 90% of
raw onnxruntime's best batched throughput, and a p50 overhead at concurrency 1 under 0.5 ms.

The lent GPU machine has onnxruntime CPU-only and no network: carry the onnxruntime-gpu wheel in
parts under 64 MiB (`split -b 60M onnxruntime_gpu-*.whl part-`) over several calls while it stays
warm, join them there (`cat part-* > onnxruntime_gpu-....whl`) and `pip install --no-deps` it first.
Nothing else needs carrying: the check and the servers it starts use only what that machine has
(grpcio, protobuf, numpy, prometheus-client, nvidia-ml-py, onnx); the servers run with REST off
(--http-port -1), so neither uvicorn nor the test tools are needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import make_models
from bench.run import Running, Workload, loadgen, raw_feeds
from server import gpu_report
from server.placement import CPU, CUDA, TENSORRT, visible_gpus
from server.runtime import bound_run
from bench.serving import start_server

GPU_MODELS = {  # name -> (benchmark model, config.pbtxt, shapes for the load generator)
    "resnet50-fp32": ("resnet50", "instance_group [{ kind: KIND_GPU }]", ()),
    "resnet50-trt-fp16": ("resnet50", 'instance_group [{ kind: KIND_GPU }]\nmax_batch_size: 32\n'
                          'input [{ name: "input" data_type: TYPE_FP32 dims: [3, 224, 224] }]\n'
                          'optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" '
                          'parameters { key: "precision_mode" value: "FP16" } }] } }', ()),  # fmt: skip
    "encoder": ("encoder", "instance_group [{ kind: KIND_GPU }]", ("input_ids=1,128", "attention_mask=1,128")),
}
GRPC_ONLY = ("--http-port", "-1")  # the lent machine has no uvicorn; the check measures over gRPC
CPU_MODELS = {"mlp": ("mlp", 'parameters { key: "io_binding" value { string_value: "1" } }', ())}


def raw_best(model_path: Path, provider: str, shapes: tuple[str, ...], seconds: float, batches=(1, 8, 32)) -> dict:
    providers = [provider, CPU] if provider != CPU else [CPU]
    session = ort.InferenceSession(str(model_path), providers=providers)
    results = {}
    for batch in batches:
        feeds = raw_feeds(session, batch, shapes)
        session.run(None, feeds)
        timings, deadline = [], time.perf_counter() + seconds / len(batches)
        while time.perf_counter() < deadline or len(timings) < 3:
            began = time.perf_counter()
            session.run(None, feeds)
            timings.append(time.perf_counter() - began)
        results[batch] = float(np.median(timings))
    best = max(results, key=lambda b: b / results[b])
    return {"provider": session.get_providers()[0], "best_batch": best, "best_inferences_per_second": best / results[best],
            "batch1_ms": results[batches[0]] * 1e3}  # fmt: skip


def io_binding_check(model_path: Path, provider: str, shapes: tuple[str, ...], runs: int) -> dict:
    """Bound outputs equal session.run's; device memory stays flat over `runs` bound batches."""
    session = ort.InferenceSession(str(model_path), providers=[provider, CPU] if provider != CPU else [CPU])
    device = "cuda:0" if session.get_providers()[0] != CPU else "cpu"
    feeds = raw_feeds(session, 4, shapes)
    names = [output.name for output in session.get_outputs()]
    expected = session.run(names, feeds)
    bound, _ = bound_run(device, session, names, feeds)
    equal = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(bound, expected))
    before = _gpu_memory_used()
    for _ in range(runs):
        bound_run(device, session, names, feeds)
    after = _gpu_memory_used()
    growth = None if before is None else after - before
    return {"device": device, "outputs_equal_session_run": equal, "device_memory_growth_bytes": growth}


def _gpu_memory_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        pynvml.nvmlShutdown()
        return int(used)
    except Exception:  # noqa: BLE001 - no NVML here: the figure is reported as not measured
        return None


def _energy_joules() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        millijoules = pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0))
        pynvml.nvmlShutdown()
        return millijoules / 1000
    except Exception:  # noqa: BLE001 - no NVML or no energy counter: not measured
        return None


def serve_and_measure(repository: Path, name: str, shapes: tuple[str, ...], concurrencies, seconds: float, extra=()) -> dict:
    began = time.perf_counter()
    server = start_server(repository, *extra, *GRPC_ONLY, timeout=900)
    loaded_seconds = time.perf_counter() - began
    try:
        config = server.client().get_model_config(name).config
        running = Running(server.url, server.process.pid, server.stop, f"http://127.0.0.1:{server.metrics_port}/metrics")
        workload = Workload(name, tuple(concurrencies), (1,), shapes)
        energy_before = _energy_joules()
        points = {c: loadgen(running, workload, c, seconds) for c in concurrencies}
        energy_after = _energy_joules()
    finally:
        server.stop()
    return {
        "provider": config.parameters["execution_provider"].string_value,
        "io_binding": config.parameters["io_binding"].string_value,
        "start_to_ready_seconds": loaded_seconds,
        "points": points,
        "energy_joules_under_load": None if energy_before is None else energy_after - energy_before,
    }


def tensorrt_cache_check(repository: Path, name: str, cache: Path) -> dict:
    missing = gpu_report.missing_libraries(gpu_report.PROVIDER_LIBRARIES[TENSORRT])
    if missing or not visible_gpus():
        return {"skipped": f"TensorRT cannot run here: missing {missing}" if missing else "no GPU visible"}
    loads = []
    for _ in range(2):
        began = time.perf_counter()
        server = start_server(repository, "--tensorrt-cache-dir", str(cache), *GRPC_ONLY, timeout=1800)
        loads.append(time.perf_counter() - began)
        server.stop()
    return {"first_load_seconds": loads[0], "second_load_seconds": loads[1], "cache_files": sorted(p.name for p in cache.iterdir())}


def check(models: dict, provider: str, concurrencies, seconds: float, workdir: Path) -> dict:
    results = {"environment": gpu_report.report(None), "models": {}}
    for label, (model, config, shapes) in models.items():
        repository = workdir / label
        make_models.write_repository(repository, [model])
        (repository / model / "config.pbtxt").write_text(config)
        path = repository / model / "1" / "model.onnx"
        print(f"{label}: raw onnxruntime, IO binding, onnxserve ...", file=sys.stderr)
        entry = {
            "raw": raw_best(path, TENSORRT if "tensorrt" in config else provider, shapes, seconds),
            "io_binding": io_binding_check(path, provider, shapes, runs=200 if provider == CPU else 1000),
            "onnxserve": serve_and_measure(repository, model, shapes, concurrencies, seconds),
        }
        if "tensorrt" in config:
            cache = workdir / f"{label}-cache"
            cache.mkdir()
            entry["tensorrt_cache"] = tensorrt_cache_check(repository, model, cache)
        results["models"][label] = entry
    return results


def tune_check(workdir: Path, out: Path, minutes: float) -> dict:
    """onnxserve-tune on the mlp, as a user runs it: on a GPU its CUDA and TensorRT FP16
    configurations are loaded and measured, with energy per inference, beside the CPU ones."""
    repository = workdir / "tune"
    make_models.write_repository(repository, ["mlp"])
    command = [sys.executable, "-m", "server.tune", "--model-repository", str(repository), "--model", "mlp",
               "--p99-ms", "20", "--rates", "200,2000", "--budget-minutes", str(minutes), "--out", str(out / "tune.json")]  # fmt: skip
    print(f"onnxserve-tune, {minutes:g} minutes ...", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True, timeout=minutes * 60 + 120)
    (out / "tune.txt").write_text(done.stdout + done.stderr)
    report = json.loads((out / "tune.json").read_text()) if (out / "tune.json").exists() else {}
    measured = report.get("measurements", [])
    return {"exit": done.returncode, "configurations": sorted({m["config"] for m in measured}),
            "joules_measured": any(m.get("joules_per_inference") for m in measured),
            "winners": [(w["rate"], w["config"]) for w in report.get("winners", [])]}  # fmt: skip


def markdown(results: dict) -> str:
    lines = ["| model | provider | raw best (batch) | c | onnxserve inf/s | / raw | p50 ms | p50 overhead at c=1 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, entry in results["models"].items():
        raw, served = entry["raw"], entry["onnxserve"]
        for concurrency, point in served["points"].items():
            overhead = f"{point['p50_ms'] - raw['batch1_ms']:.3f} ms" if concurrency == min(served["points"]) else ""
            lines.append(
                f"| {label} | {served['provider']} | {raw['best_inferences_per_second']:,.0f} ({raw['best_batch']}) | {concurrency} "
                f"| {point['inferences_per_second']:,.0f} | {point['inferences_per_second'] / raw['best_inferences_per_second']:.2f} "
                f"| {point['p50_ms']:.3f} | {overhead} |"
            )
    if "tune" in results:
        tune = results["tune"]
        lines.append(f"- onnxserve-tune (exit {tune['exit']}): {len(tune['configurations'])} configurations measured "
                     f"({', '.join(tune['configurations'])}); energy per inference measured: {tune['joules_measured']}; "
                     f"winners {tune['winners']}")  # fmt: skip
    lines.append("")
    for label, entry in results["models"].items():
        raw, points = entry["raw"], entry["onnxserve"]["points"]
        best = max(point["inferences_per_second"] for point in points.values()) / raw["best_inferences_per_second"]
        overhead = points[min(points)]["p50_ms"] - raw["batch1_ms"]
        lines.append(f"- {label}: {best:.2f} of raw onnxruntime's best ({'met' if best >= 0.9 else 'NOT met'}, target 0.90); "
                     f"p50 overhead at c={min(points)} {overhead:.3f} ms ({'met' if overhead < 0.5 else 'NOT met'}, target < 0.5 ms); "
                     f"IO binding equal to session.run: {entry['io_binding']['outputs_equal_session_run']}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the plumbing only, on the CPU (what CI runs)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per measured point")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--tune-minutes", type=float, default=None,
                        help="budget of the onnxserve-tune step (default 2 on a GPU, 0 = none with --cpu)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.cpu and not visible_gpus():
        parser.error("no NVIDIA GPU is visible (NVML): run on the GPU machine, or pass --cpu to test the plumbing")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxserve-gpu-check-") as scratch:
        if args.cpu:
            results = check(CPU_MODELS, CPU, (1, 8), args.seconds, Path(scratch))
        else:
            results = check(GPU_MODELS, CUDA, (1, 16, 128), args.seconds, Path(scratch))
        minutes = args.tune_minutes if args.tune_minutes is not None else (0 if args.cpu else 2)
        if minutes:
            results["tune"] = tune_check(Path(scratch), args.out, minutes)
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (args.out / "gpu-check.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (args.out / "gpu-check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
