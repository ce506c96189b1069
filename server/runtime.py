"""onnxruntime sessions of one model version: execution provider choice and
fallback, IO specs from the graph, warm-up, and `run` in a thread per instance
(or on the event loop itself for batches measured to be shorter than the handoff)."""

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.config import SessionSettings
from server.errors import ConfigError, ExecutionFailed
from server.tensors import DATATYPE_BY_ORT, DATATYPES, TensorSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GRAPH_LEVELS = {
    0: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    99: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Per batch: a preempted run (hundreds of us on a busy VM) is forgotten within about 20 batches.
RUN_PEAK_DECAY = 0.9
# Triton's accelerator parameter names that differ from onnxruntime's TensorRT EP options.
TENSORRT_RENAMES = {"max_workspace_size_bytes": "trt_max_workspace_size"}


def visible_gpus() -> int:
    """NVIDIA GPUs the driver reports; 0 where there is no driver or no device."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no driver, no library: a CPU machine
        log.debug("NVML unavailable: %s", err)
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def cpu_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU limit.

    Kubernetes limits CPU with a cgroup quota, not with affinity, so without the cap a
    pod limited to 2 cores on a 64-core node would start 64 intra-op threads and be throttled.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return cores if limit is None else max(1, min(cores, math.floor(limit)))


def cgroup_cpu_limit(root: Path) -> float | None:
    """The CPU quota in cores (cgroup v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    v2 = _read_words(root / "cpu.max")  # "max 100000" or "200000 100000"
    if v2 is not None and len(v2) == 2:
        return None if v2[0] == "max" else int(v2[0]) / int(v2[1])
    for controller in ("cpu", "cpu,cpuacct"):
        quota = _read_words(root / controller / "cpu.cfs_quota_us")
        period = _read_words(root / controller / "cpu.cfs_period_us")
        if quota and period:
            return None if int(quota[0]) <= 0 else int(quota[0]) / int(period[0])
    return None


def _read_words(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except OSError:  # absent on this kernel or cgroup version
        return None


@dataclass(frozen=True)
class Placement:
    """Where one instance runs and which providers it asks for, best first."""

    device: str  # "cpu" or "cuda:N"
    providers: list  # [(name, options), ...] as InferenceSession takes them


def plan_placements(settings: SessionSettings, gpus: int, label: str) -> list[Placement]:
    wants_gpu = settings.instance_kind == "gpu" or bool(settings.gpu_accelerators)
    if settings.instance_kind == "cpu" or gpus == 0:
        if gpus == 0 and wants_gpu:
            log.warning("%s: GPU execution asked for but no GPU is visible: falling back to CPU", label)
        return [Placement("cpu", [(CPU, {})])] * settings.instance_count
    device_ids = list(settings.gpus) or [0]
    placements = []
    for device_id in device_ids:
        providers = _gpu_providers(settings, device_id)
        placements += [Placement(f"cuda:{device_id}", providers)] * settings.instance_count
    return placements


def _gpu_providers(settings: SessionSettings, device_id: int) -> list:
    providers, cuda_options = [], {"device_id": device_id}
    for accelerator in settings.gpu_accelerators:
        options = dict(accelerator.parameters)
        if accelerator.name == "tensorrt":
            trt = {"device_id": device_id}
            for key, value in options.items():
                if key == "precision_mode":
                    trt["trt_fp16_enable"] = value.upper() == "FP16"
                else:
                    trt[TENSORRT_RENAMES.get(key, key)] = value
            providers.append((TENSORRT, trt))
        else:
            cuda_options.update(options)
    return providers + [(CUDA, cuda_options), (CPU, {})]


def session_options(settings: SessionSettings, instances: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Instances x intra-op threads should not oversubscribe the cores.
    options.intra_op_num_threads = settings.intra_op_threads or max(1, cpu_cores() // instances)
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = GRAPH_LEVELS[settings.graph_optimization_level]
    options.log_severity_level = 3  # onnxruntime's warnings are noise here; errors still show
    return options


def graph_specs(args, model_path: Path) -> tuple[TensorSpec, ...]:
    """Inputs or outputs of a session as TensorSpecs with the graph's full shapes (-1 = symbolic)."""
    specs = []
    for arg in args:
        datatype = DATATYPE_BY_ORT.get(arg.type)
        if datatype is None:
            raise ConfigError(f"{model_path}: tensor '{arg.name}' has type {arg.type}, which onnxserve cannot serve")
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
        specs.append(TensorSpec(arg.name, datatype.wire, shape))
    return tuple(specs)


class InstancePool:
    """N sessions of one model file, each with its own worker thread."""

    def __init__(self, model_path: Path, settings: SessionSettings, label: str) -> None:
        self.label = label
        placements = plan_placements(settings, visible_gpus(), label)
        options = session_options(settings, len(placements))
        self._sessions = [self._open(model_path, options, p) for p in placements]
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{label}-{i}") for i in range(len(placements))
        ]
        first = self._sessions[0]
        self.provider = first.get_providers()[0]
        # Where each instance really runs: a GPU placement that fell back to the CPU provider is "cpu".
        self.devices = tuple(
            p.device if session.get_providers()[0] != CPU else "cpu" for p, session in zip(placements, self._sessions)
        )
        self.device = self.devices[0]
        self.intra_op_threads = options.intra_op_num_threads
        self.inputs = graph_specs(first.get_inputs(), model_path)
        self.outputs = graph_specs(first.get_outputs(), model_path)
        below = settings.inline_run_below_us / 1e6
        self._peaks = [RunPeak(below) if below else None for _ in self._sessions]

    @property
    def instance_count(self) -> int:
        return len(self._sessions)

    def _open(self, model_path: Path, options: ort.SessionOptions, placement: Placement) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(
                str(model_path),
                sess_options=options,
                providers=[name for name, _ in placement.providers],
                provider_options=[opts for _, opts in placement.providers],
            )
        except Exception as err:
            raise ConfigError(f"{model_path}: onnxruntime cannot load the model: {err}") from None
        asked, used = placement.providers[0][0], session.get_providers()[0]
        if asked != used:
            log.warning("%s: asked for %s but onnxruntime runs it on %s", self.label, asked, used)
        return session

    def warm_up(self, inputs: tuple[TensorSpec, ...]) -> None:
        """One inference per instance with zeros (variable dims = 1); blocking."""
        feeds = {spec.name: _zeros(spec) for spec in inputs}
        for session in self._sessions:
            try:
                session.run(None, feeds)
            except Exception as err:
                raise ConfigError(f"{self.label}: warm-up inference failed: {err}") from None

    async def run(self, feeds: dict[str, np.ndarray], output_names: list[str], instance: int) -> dict[str, np.ndarray]:
        session, peak = self._sessions[instance], self._peaks[instance]
        try:
            if peak is not None and peak.inline:
                values, seconds = _timed_run(session, output_names, feeds)
            else:
                executor = self._executors[instance]
                values, seconds = await asyncio.get_running_loop().run_in_executor(
                    executor, _timed_run, session, output_names, feeds
                )
        except Exception as err:
            raise ExecutionFailed(f"{self.label}: onnxruntime failed: {err}") from err
        if peak is not None:
            self._record(peak, seconds, instance)
        return dict(zip(output_names, values))

    def _record(self, peak: "RunPeak", seconds: float, instance: int) -> None:
        peak.record(seconds)
        if peak.inline and not peak.announced:
            peak.announced = True
            log.info(
                "%s instance %d: batches run in %.0f us, under inline_run_below_us; "
                "they run on the event loop while that holds",
                self.label, instance, peak.seconds * 1e6,
            )  # fmt: skip

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._sessions.clear()


def _timed_run(session: ort.InferenceSession, output_names: list[str], feeds: dict) -> tuple[list, float]:
    started = time.perf_counter()
    values = session.run(output_names, feeds)
    return values, time.perf_counter() - started


@dataclass
class RunPeak:
    """A decaying peak of one instance's session.run times: its next batch runs on the event loop
    while the peak stays below `limit` seconds. The first batch always runs in the thread."""

    limit: float
    seconds: float | None = None
    inline: bool = False
    announced: bool = False  # the log has said so once

    def record(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else max(seconds, self.seconds * RUN_PEAK_DECAY)
        self.inline = self.seconds < self.limit


def _zeros(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if dim == -1 else dim for dim in spec.shape)
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=DATATYPES[spec.datatype].numpy)
