"""The raw side of the GPU check (bench/gpu_check.py): onnxruntime sessions opened in this process
exactly as a server reports opening its own (providers, provider options and session settings from
ModelConfig's parameters), timed without any server; and the two adapters to the server's GPU
helpers (NVIDIA's libraries, NVML readings), so that each is known in one place only."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.run import raw_feeds
from server.engine.placement import CPU

# Served and raw answers are compared within these: TF32 and a kernel chosen per shape (a padded
# batch of 4 rows against 3 raw rows) move results by about 1e-3; a replayed graph reading a stale
# or wrong buffer moves them by about 1e-1.
TOLERANCE = {"rtol": 1e-2, "atol": 2e-3}


@functools.cache
def preload_cuda() -> tuple[str, ...]:
    """What the server does before its first CUDA session, done once in this process: CUDA numbers
    GPUs in NVML's order (read once, when CUDA starts), and NVIDIA's pip-installed libraries are
    loaded where onnxruntime's providers find them. What could not be loaded, and any warning."""
    from server.engine import cuda_libraries
    from server.observe import nvml_devices

    order = nvml_devices.pin_cuda_order(os.environ)
    return tuple(([order] if order else []) + list(cuda_libraries.preload()))


def device_reading(device: str = "cuda:0") -> dict:
    """{"memory_used": bytes, "energy_joules": joules} of one CUDA device; each None where NVML
    cannot say (no GPU, no driver, a GPU without the counter)."""
    from server.observe import nvml_devices

    found = nvml_devices.read(device) or {}
    return {"memory_used": found.get("memory_used"), "energy_joules": found.get("energy_joules")}


def gpu_names() -> list[str]:
    """The name of each GPU CUDA sees, in CUDA's order; empty without NVML."""
    from server.observe import nvml_devices

    return nvml_devices.gpu_names()


def provider_list(parameters: dict[str, str]) -> tuple[list, str]:
    """[[provider, {option: value}], ...] as the server opened instance 0's session, and where that
    list came from (a server without the provider_options parameter only names its provider)."""
    text = parameters.get("provider_options")
    if text:
        return [[name, dict(options)] for name, options in json.loads(text)], "server"
    provider = parameters.get("execution_provider") or CPU
    return [[provider, {}]] + (
        [[CPU, {}]] if provider != CPU else []
    ), "guessed: the server reports no provider_options"


def without_option(providers: list, option: str) -> list:
    """The same providers less one option (enable_cuda_graph, for a plain session.run baseline:
    a graph replays fixed addresses, which session.run does not keep)."""
    return [[name, {k: v for k, v in options.items() if k != option}] for name, options in providers]


def session_options(parameters: dict[str, str]) -> ort.SessionOptions:
    """server/engine/runtime.py's session options, from the values ModelConfig reports in force."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(parameters.get("intra_op_thread_count") or 0)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", parameters.get("allow_spinning") or "1")
    return options


def open_session(path: Path, parameters: dict[str, str], providers: list) -> ort.InferenceSession:
    """A session with exactly these providers and options. enable_fallback=0: onnxruntime's Python
    wrapper would otherwise retry a provider that fails with its own list and default options."""
    preload_cuda()
    return ort.InferenceSession(
        str(path),
        session_options(parameters),
        providers=[name for name, _ in providers],
        provider_options=[options for _, options in providers],
        enable_fallback=0,
    )


def time_batches(session: ort.InferenceSession, shapes: tuple[str, ...], batches, seconds: float) -> dict[int, dict]:
    """{batch: median ms per run, inferences/s}, `seconds` shared between the batch sizes."""
    results = {}
    for batch in batches:
        feeds = raw_feeds(session, batch, shapes)
        session.run(None, feeds)  # the first run at a shape chooses kernels (cuDNN's search): not timed
        timings, deadline = [], time.perf_counter() + seconds / len(batches)
        while time.perf_counter() < deadline or len(timings) < 3:
            began = time.perf_counter()
            session.run(None, feeds)
            timings.append(time.perf_counter() - began)
        median = float(np.median(timings))
        results[batch] = {"ms": median * 1e3, "inferences_per_second": batch / median, "runs": len(timings)}
    return results


def reference(raw: dict[int, dict], concurrency: int) -> tuple[int, dict]:
    """The raw figure a served concurrency is held to: the best raw batch no larger than the
    concurrency (a server with that many callers cannot form a larger one)."""
    fitting = [batch for batch in raw if batch <= concurrency] or [min(raw)]
    best = max(fitting, key=lambda batch: raw[batch]["inferences_per_second"])
    return best, raw[best]


def max_difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
        for a, b in zip(got, expected)
    )


def close(got: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    return len(got) == len(expected) and all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, **TOLERANCE) for a, b in zip(got, expected)
    )
