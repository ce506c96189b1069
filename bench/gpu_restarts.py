"""The GPU check's steps that start servers of their own (bench/gpu_steps.py has the others):
TensorRT FP16 with its engine cache reused across a restart, and onnxserve-tune. Each first stops
the shared server, so that one server at a time uses the GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import gpu_raw
from bench.gpu_steps import GRPC_ONLY, ON_GPU, Context, Failed, Skip, judged, rows, write_models
from bench.grpc_client import Client
from bench.run import Running, Workload, loadgen
from bench.serving import start_server
from server.engine.placement import PROVIDER_LIBRARIES, TENSORRT
from server.tools import gpu_report


def tensorrt_config(rows: int) -> str:
    return (
        f'{ON_GPU}\nmax_batch_size: {rows}\ninput [{{ name: "input" data_type: TYPE_FP32 dims: [3, 224, 224] }}]\n'
        'optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" '
        'parameters { key: "precision_mode" value: "FP16" } }] } }'
    )


def tensorrt(ctx: Context) -> dict:
    """One FP16 engine build into --tensorrt-cache-dir, measured served; a restart that loads it
    faster; then raw onnxruntime with the server's own TensorRT options (the cached engine)."""
    ctx.stop()
    gpu_raw.preload_cuda()  # TensorRT's pip libraries, where installed, load here or not at all
    missing = gpu_report.missing_libraries(PROVIDER_LIBRARIES[TENSORRT])
    if ctx.plan.cpu:
        raise Skip(
            f"needs a GPU (--cpu); TensorRT's libraries here: {'all load' if not missing else 'missing ' + ', '.join(missing)}"
        )
    if missing:
        raise Skip(f"TensorRT's libraries do not load here: missing {', '.join(missing)}")
    batch = 8 if ctx.plan.quick else 32  # the profile's largest batch: a smaller one builds sooner
    repository = write_models(ctx.plan.workdir / "tensorrt", {"resnet50_trt": ("resnet50", tensorrt_config(batch), ())})
    cache = ctx.plan.workdir / "tensorrt-cache"
    cache.mkdir(exist_ok=True)
    ctx.say("TensorRT: first load, building the FP16 engine ...")
    first, parameters, served = serve_tensorrt(ctx, repository, cache, measure=True)
    ctx.say("TensorRT: restart, loading the cached engine ...")
    second, _, _ = serve_tensorrt(ctx, repository, cache, measure=False)
    listed, source = gpu_raw.provider_list(parameters)
    session = gpu_raw.open_session(
        repository / "resnet50_trt" / "1" / "model.onnx", parameters, listed
    )  # after: not a build of its own
    raw = gpu_raw.time_batches(session, (), (1, batch), ctx.plan.seconds)
    found = {
        "model": "resnet50_trt",
        "first_load_seconds": first,
        "second_load_seconds": second,
        "provider_options": listed,
        "provider_options_from": source,
        "cache_files": sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()),
        "raw": raw,
        "served": served,
    }
    found["rows"] = rows(
        "resnet50_trt", parameters.get("execution_provider", "?"), session.get_providers()[0], raw, served
    )
    found = judged(found, f"loads in {first:.1f} s, then {second:.1f} s from the cache; ")
    wrong = (
        [f"served on {parameters.get('execution_provider')}"]
        if parameters.get("execution_provider") != TENSORRT
        else []
    )
    wrong += [] if second < first else ["the restart was not faster: the cache was not used"]
    if wrong:
        raise Failed(f"{'; '.join(wrong)}; {found['summary']}", found)
    return found


def serve_tensorrt(ctx: Context, repository: Path, cache: Path, measure: bool) -> tuple[float, dict, dict]:
    """Seconds from start to ready, the model's parameters, and (with `measure`) load generator points."""
    began = time.perf_counter()
    server = start_server(repository, "--tensorrt-cache-dir", str(cache), *GRPC_ONLY, timeout=900)
    seconds, served = time.perf_counter() - began, {}
    try:
        with Client(server.url) as client:
            parameters = client.parameters("resnet50_trt")
        running = Running(
            server.url, server.process.pid, server.stop, f"http://127.0.0.1:{server.metrics_port}/metrics"
        )
        for concurrency in ctx.plan.concurrencies if measure else ():
            served[concurrency] = loadgen(
                running, Workload("resnet50_trt", (concurrency,), (1,)), concurrency, ctx.plan.seconds
            )
    finally:
        server.stop()
    return seconds, parameters, served


def tune(ctx: Context) -> dict:
    """onnxserve-tune on the mlp, as a user runs it: on a GPU its CUDA and TensorRT FP16
    configurations are loaded and measured, with energy per inference, beside the CPU ones."""
    ctx.stop()
    minutes, out = ctx.plan.tune_minutes, ctx.plan.out
    repository = write_models(ctx.plan.workdir / "tune", {"mlp": ("mlp", "", ())})  # no config: a user's defaults
    command = [
        sys.executable,
        "-m",
        "server.tune",
        "--model-repository",
        str(repository),
        "--model",
        "mlp",
        "--p99-ms",
        "20",
        "--rates",
        "200,2000",
        "--budget-minutes",
        str(minutes),
        "--out",
        str(out / "tune.json"),
    ]
    ctx.say(f"onnxserve-tune, {minutes:g} minutes ...")
    done = subprocess.run(command, capture_output=True, text=True, timeout=minutes * 60 + 120)
    (out / "tune.txt").write_text(done.stdout + done.stderr)
    report = json.loads((out / "tune.json").read_text()) if (out / "tune.json").exists() else {}
    measured = report.get("measurements", [])
    found = {
        "exit": done.returncode,
        "configurations": sorted({m["config"] for m in measured}),
        "joules_measured": any(m.get("joules_per_inference") for m in measured),
        "winners": [(w["rate"], w["config"]) for w in report.get("winners", [])],
    }
    found["summary"] = (
        f"exit {done.returncode}: {len(found['configurations'])} configurations measured "
        f"({', '.join(found['configurations'])}); energy per inference measured: {found['joules_measured']}; "
        f"winners {found['winners']}"
    )
    if done.returncode not in (0, 1) or not measured:
        raise Failed(found["summary"] + f"; {done.stderr[-500:]}", found)
    return found
