"""Where a model version's instances run: the CPU, or GPUs with the CUDA and TensorRT providers
and their options; sessions opened there and checked to run where they were asked to; and what
happens when a GPU is asked for and cannot be had."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from server.engine import providers
from server.errors import ConfigError
from server.models.model_config import SessionSettings

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
    """GPUs CUDA sees (CUDA_VISIBLE_DEVICES applied, as device_id counts them); 0 where there is
    no driver or no device."""
    from server.observe import nvml_devices

    return nvml_devices.count()


@dataclass(frozen=True)
class Placement:
    """Where one instance runs and which providers it asks for, best first."""

    device: str  # "cpu" or "cuda:N"
    providers: list  # [(name, options), ...] as InferenceSession takes them


def plan_placements(
    settings: SessionSettings, gpus: int, label: str, policy: GpuPolicy = GpuPolicy()
) -> list[Placement]:
    wants_gpu = settings.instance_kind == "gpu" or bool(settings.gpu_accelerators)
    if settings.instance_kind == "cpu" or gpus == 0:
        if gpus == 0 and wants_gpu:
            no_gpu(label, providers.provider_unavailable_reason(PROVIDER_LIBRARIES[CUDA], gpus), policy)
        return [Placement("cpu", [(CPU, {})])] * settings.instance_count
    device_ids = list(settings.gpus) or [0]
    placements = []
    for device_id in device_ids:
        placements += [
            Placement(f"cuda:{device_id}", _gpu_providers(settings, device_id, policy))
        ] * settings.instance_count
    return placements


def no_gpu(label: str, reason: str, policy: GpuPolicy) -> None:
    """GPU execution was asked for and cannot be had: a load failure with --require-gpu, else a loud fallback."""
    if policy.require:
        raise ConfigError(f"{label}: GPU execution is asked for, but {reason}; --require-gpu makes that a load failure")
    log.warning(
        "%s: GPU execution is asked for, but %s: it runs on the CPU (--require-gpu would fail the load)", label, reason
    )


def open_session(
    model_path: Path, options: ort.SessionOptions, placement: Placement, label: str, policy: GpuPolicy
) -> tuple[ort.InferenceSession, Placement]:
    """A session where `placement` says, or the loud account of where it runs instead: the session
    and the placement it really has (device and providers as asked of onnxruntime).

    onnxruntime's Python wrapper retries a provider that raises with its own list, the CUDA provider
    with default options (device 0, no memory limit, no graph): so the fallback is ours
    (enable_fallback=0 also stops it swapping providers when a run fails). A CUDA provider that
    cannot be created is skipped inside onnxruntime with only a log line; verify() catches that."""
    asked, placement = placement, loadable(placement, label)
    try:
        session = _session(model_path, options, placement)
    except ConfigError as err:  # _session's words: "onnxruntime cannot load the model: ..."
        if placement.providers[0][0] != TENSORRT:
            raise
        placement = _without_tensorrt(placement, label, f"onnxruntime refused it: {err}")
        session = _session(model_path, options, placement)
    return session, verify(session, placement, asked, label, policy)


def _session(model_path: Path, options: ort.SessionOptions, placement: Placement) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(model_path),
            sess_options=options,
            providers=[name for name, _ in placement.providers],
            provider_options=[opts for _, opts in placement.providers],
            enable_fallback=0,
        )
    except Exception as err:
        raise ConfigError(f"{model_path}: onnxruntime cannot load the model: {err}") from None


def loadable(placement: Placement, label: str) -> Placement:
    """The placement less TensorRT where its provider library cannot be loaded (no libnvinfer)."""
    if placement.providers[0][0] != TENSORRT:
        return placement
    reason = providers.library_unloadable(PROVIDER_LIBRARIES[TENSORRT])
    return _without_tensorrt(placement, label, reason) if reason else placement


def _without_tensorrt(placement: Placement, label: str, reason: str) -> Placement:
    log.warning("%s: TensorRT is asked for, but %s: it runs on CUDA with its own options", label, reason)
    return Placement(placement.device, [(name, opts) for name, opts in placement.providers if name != TENSORRT])


# What must hold for a session to run where it was placed: onnxruntime echoes each option back in
# get_provider_options(), as a decimal number or 0/1 (cuda_execution_provider_info.cc,
# tensorrt_execution_provider_info.cc).
CHECKED_OPTIONS = {
    CUDA: ("device_id", "gpu_mem_limit", "enable_cuda_graph"),
    TENSORRT: ("device_id", "trt_fp16_enable", "trt_bf16_enable", "trt_int8_enable"),
}


def mismatches(asked: list, providers_in_use: list[str], options_in_use: dict) -> list[str]:
    """How a session's providers and options differ from those asked for (empty when they match)."""
    found = []
    if providers_in_use[0] != asked[0][0]:
        found.append(f"asked for {asked[0][0]}, onnxruntime runs it on {providers_in_use[0]}")
    for name, options in asked:
        if name not in providers_in_use:
            continue
        for key in CHECKED_OPTIONS.get(name, ()):
            wanted, got = options.get(key), options_in_use.get(name, {}).get(key)
            if wanted is not None and got is not None and _normal(wanted) != _normal(got):
                found.append(f"{name} {key} is {got}, asked for {wanted}")
    return found


def _normal(value: str) -> str:
    """One spelling for what onnxruntime may echo differently: True/1, 0042/42."""
    text = str(value).strip()
    if text.isdigit():
        return str(int(text))
    return {"true": "1", "false": "0"}.get(text.lower(), text)


def verify(
    session: ort.InferenceSession, placement: Placement, asked: Placement, label: str, policy: GpuPolicy
) -> Placement:
    """The placement the session really has. A GPU placement that runs elsewhere fails the load
    under --require-gpu; otherwise it is logged as an error and billed where it really runs."""
    in_use, options = session.get_providers(), session.get_provider_options()
    found = mismatches(placement.providers, in_use, options)
    if not found:
        return placement
    if in_use[0] == CPU:
        reason = providers.provider_unavailable_reason(
            PROVIDER_LIBRARIES.get(placement.providers[0][0], Path()), visible_gpus()
        )
        no_gpu(label, reason, policy)
        return Placement("cpu", [(CPU, {})])
    if policy.require:
        raise ConfigError(f"{label}: {'; '.join(found)}; --require-gpu makes that a load failure")
    device = f"cuda:{options.get(in_use[0], {}).get('device_id', placement.device.partition(':')[2])}"
    log.error(
        "%s: %s: it runs on %s with these options, and %s is billed (asked: %s)",
        label,
        "; ".join(found),
        in_use[0],
        device,
        asked.providers,
    )
    return Placement(device, placement.providers)  # what it was opened with, billed where it runs


def _gpu_providers(settings: SessionSettings, device_id: int, policy: GpuPolicy) -> list:
    chosen, cuda = [], dict(settings.model_cuda_options)
    for accelerator in settings.gpu_accelerators:
        parameters = dict(accelerator.parameters)
        if accelerator.name == "tensorrt":
            options = providers.tensorrt_options(
                device_id, parameters, policy.tensorrt_profiles, policy.tensorrt_cache_dir
            )
            chosen.append((TENSORRT, options))
        else:
            cuda.update(parameters)
    return chosen + [(CUDA, providers.cuda_options(device_id, cuda)), (CPU, {})]
