"""Where a model version's instances run: the CPU, or GPUs with the CUDA and TensorRT providers
and their options, and what happens when a GPU is asked for and cannot be had."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from server import providers
from server.errors import ConfigError
from server.model_config import SessionSettings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_LIBRARIES = {
    CUDA: Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so",
    TENSORRT: Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so",
}


@dataclass(frozen=True)
class GpuPolicy:
    """What the server was told about GPUs (--require-gpu, --tensorrt-cache-dir), and a model's
    TensorRT optimisation profiles (from its config)."""

    require: bool = False
    tensorrt_cache_dir: Path | None = None
    tensorrt_profiles: dict = field(default_factory=dict)
    hardware: str = ""  # the GPUs' names (NVML): part of the engine cache's key


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


@dataclass(frozen=True)
class Placement:
    """Where one instance runs and which providers it asks for, best first."""

    device: str  # "cpu" or "cuda:N"
    providers: list  # [(name, options), ...] as InferenceSession takes them


def plan_placements(settings: SessionSettings, gpus: int, label: str, policy: GpuPolicy = GpuPolicy()) -> list[Placement]:
    wants_gpu = settings.instance_kind == "gpu" or bool(settings.gpu_accelerators)
    if settings.instance_kind == "cpu" or gpus == 0:
        if gpus == 0 and wants_gpu:
            no_gpu(label, providers.provider_unavailable_reason(PROVIDER_LIBRARIES[CUDA], gpus), policy)
        return [Placement("cpu", [(CPU, {})])] * settings.instance_count
    device_ids = list(settings.gpus) or [0]
    placements = []
    for device_id in device_ids:
        placements += [Placement(f"cuda:{device_id}", _gpu_providers(settings, device_id, policy))] * settings.instance_count
    return placements


def no_gpu(label: str, reason: str, policy: GpuPolicy) -> None:
    """GPU execution was asked for and cannot be had: a load failure with --require-gpu, else a loud fallback."""
    if policy.require:
        raise ConfigError(f"{label}: GPU execution is asked for, but {reason}; --require-gpu makes that a load failure")
    log.warning("%s: GPU execution is asked for, but %s: it runs on the CPU (--require-gpu would fail the load)", label, reason)


def _gpu_providers(settings: SessionSettings, device_id: int, policy: GpuPolicy) -> list:
    chosen, cuda = [], dict(settings.model_cuda_options)
    for accelerator in settings.gpu_accelerators:
        parameters = dict(accelerator.parameters)
        if accelerator.name == "tensorrt":
            options = providers.tensorrt_options(device_id, parameters, policy.tensorrt_profiles, policy.tensorrt_cache_dir)
            chosen.append((TENSORRT, options))
        else:
            cuda.update(parameters)
    return chosen + [(CUDA, providers.cuda_options(device_id, cuda)), (CPU, {})]
