"""GPU execution provider options: what config.pbtxt may say to onnxruntime's CUDA and TensorRT
providers, with Triton's ORT-backend names, checked at load (onnxruntime refuses an option it does
not know with "Unknown provider option" or "Invalid TensorRT EP option", so a misspelt one is
named here, with its file and field, before any session opens), plus TensorRT's optimisation
profiles and engine cache, and why a GPU provider cannot be used here."""

import ctypes
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

from server.errors import ConfigError

log = logging.getLogger(__name__)


def _integer(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("not a non-negative integer")
    return int(text)


def _onnxruntime_bool(value: bool) -> str:
    """onnxruntime's Python binding takes TensorRT's switches only as True/False (and CUDA's too)."""
    return "True" if value else "False"


def flag(text: str) -> bool:
    """A boolean option's value as config.pbtxt may spell it; ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered not in ("0", "1", "true", "false"):
        raise ValueError("not 0, 1, true or false")
    return lowered in ("1", "true")


def _choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise ValueError(f"not one of {list(names)}")
        return text

    return parse


def _text(text: str) -> str:
    return text


# onnxruntime CUDA provider options (its names), as config.pbtxt may give them.
CUDA_OPTIONS: dict[str, Callable[[str], object]] = {
    "gpu_mem_limit": _integer,
    "arena_extend_strategy": _choice("0", "1", "kNextPowerOfTwo", "kSameAsRequested"),
    "cudnn_conv_algo_search": _choice("0", "1", "2", "EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    "do_copy_in_default_stream": flag,
    "cudnn_conv_use_max_workspace": flag,
    "cudnn_conv1d_pad_to_nc1d": flag,
    "enable_cuda_graph": flag,
    "use_tf32": flag,
    "prefer_nhwc": flag,
    "use_ep_level_unified_stream": flag,
    "tunable_op_enable": flag,
    "tunable_op_tuning_enable": flag,
    "tunable_op_max_tuning_duration_ms": _integer,
    "enable_skip_layer_norm_strict_mode": flag,
    "fuse_conv_bias": flag,
    "sdpa_kernel": _integer,
}
# Triton's ORT backend reads these four from the model-level `parameters` too (its older form).
CUDA_MODEL_PARAMETERS = (
    "cudnn_conv_algo_search",
    "gpu_mem_limit",
    "arena_extend_strategy",
    "do_copy_in_default_stream",
)
ALGO_SEARCH = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
ARENA_STRATEGY = {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"}

# Triton's names for the TensorRT accelerator, and onnxruntime's trt_* options passed through.
TENSORRT_TRITON_OPTIONS: dict[str, Callable[[str], object]] = {
    "precision_mode": _choice("FP32", "FP16", "BF16", "INT8"),
    "max_workspace_size_bytes": _integer,
    "trt_engine_cache_enable": flag,
    "trt_engine_cache_path": _text,
    "int8_calibration_table_name": _text,
    "int8_use_native_calibration_table": flag,
}
TENSORRT_PASSTHROUGH: dict[str, Callable[[str], object]] = {
    **{
        name: _integer
        for name in (
            "trt_max_partition_iterations",
            "trt_min_subgraph_size",
            "trt_dla_core",
            "trt_builder_optimization_level",
            "trt_auxiliary_streams",
            "trt_ep_context_embed_mode",
        )
    },
    **{
        name: flag
        for name in (
            "trt_dla_enable",
            "trt_dump_subgraphs",
            "trt_force_sequential_engine_build",
            "trt_context_memory_sharing_enable",
            "trt_layer_norm_fp32_fallback",
            "trt_timing_cache_enable",
            "trt_force_timing_cache",
            "trt_detailed_build_log",
            "trt_build_heuristics_enable",
            "trt_sparsity_enable",
            "trt_cuda_graph_enable",
            "trt_dump_ep_context_model",
        )
    },
    **{
        name: _text
        for name in (
            "trt_engine_cache_prefix",
            "trt_timing_cache_path",
            "trt_tactic_sources",
            "trt_extra_plugin_lib_paths",
            "trt_profile_min_shapes",
            "trt_profile_max_shapes",
            "trt_profile_opt_shapes",
            "trt_ep_context_file_path",
        )
    },
}
TENSORRT_OPTIONS = {**TENSORRT_TRITON_OPTIONS, **TENSORRT_PASSTHROUGH}
ACCELERATOR_OPTIONS = {"cuda": CUDA_OPTIONS, "tensorrt": TENSORRT_OPTIONS}


def check_options(accelerator: str, parameters: dict[str, str], where: str) -> None:
    """ConfigError naming the field for an option onnxserve would pass on but onnxruntime would drop."""
    known = ACCELERATOR_OPTIONS[accelerator]
    for key, value in sorted(parameters.items()):
        if key not in known:
            raise ConfigError(f"{where}.parameters[{key!r}]: unknown {accelerator} option; known: {sorted(known)}")
        try:
            parsed = known[key](value)
        except ValueError as err:
            raise ConfigError(f"{where}.parameters[{key!r}]: {value!r} is {err}") from None
        if key == "trt_cuda_graph_enable" and parsed:
            raise ConfigError(
                f"{where}.parameters[{key!r}]: onnxserve replays CUDA graphs through the cuda accelerator's "
                "enable_cuda_graph (fixed-shape models, IO binding at fixed addresses); leave this off"
            )


def check_combination(accelerators: list[tuple[str, dict]], where: str) -> None:
    """ConfigError for accelerators that cannot open together: a CUDA graph needs every node on the
    CUDA provider (inference_session.cc refuses the session otherwise), and TensorRT takes them."""
    names = {name for name, _ in accelerators}
    graphs = any(name == "cuda" and flag(options.get("enable_cuda_graph", "0")) for name, options in accelerators)
    if graphs and "tensorrt" in names:
        raise ConfigError(
            f"{where}: the cuda accelerator's enable_cuda_graph needs every node on CUDA, and the tensorrt "
            "accelerator takes them: onnxruntime would refuse the session; use one or the other"
        )


def cuda_options(device_id: int, parameters: dict[str, str]) -> dict[str, str]:
    """onnxruntime's CUDA provider options; Triton's numeric spellings become onnxruntime's names."""
    options = {"device_id": str(device_id)}
    for key, value in parameters.items():
        if key == "cudnn_conv_algo_search":
            value = ALGO_SEARCH.get(value, value)
        elif key == "arena_extend_strategy":
            value = ARENA_STRATEGY.get(value, value)
        elif CUDA_OPTIONS[key] is flag:
            value = _onnxruntime_bool(flag(value))
        options[key] = value
    return options


def tensorrt_options(
    device_id: int, parameters: dict[str, str], profiles: dict[str, str], cache_dir: Path | None
) -> dict[str, str]:
    """onnxruntime's TensorRT provider options from Triton's names; engine and timing caches in
    `cache_dir` when one is given; optimisation profiles so the engine is built at load."""
    options = {"device_id": str(device_id), **profiles}
    if cache_dir is not None:
        options.update(
            trt_engine_cache_enable="True",
            trt_engine_cache_path=str(cache_dir),
            trt_timing_cache_enable="True",
            trt_timing_cache_path=str(cache_dir),
        )
    for key, value in parameters.items():
        if TENSORRT_OPTIONS.get(key) is flag:
            value = _onnxruntime_bool(flag(value))
        if key == "precision_mode":
            options["trt_fp16_enable"] = _onnxruntime_bool(value == "FP16")
            options["trt_bf16_enable"] = _onnxruntime_bool(value == "BF16")
            options["trt_int8_enable"] = _onnxruntime_bool(value == "INT8")
        elif key == "max_workspace_size_bytes":
            options["trt_max_workspace_size"] = value
        elif key in ("int8_calibration_table_name", "int8_use_native_calibration_table"):
            options[f"trt_{key}"] = value
        else:
            options[key] = value
    return options


def profile_shapes(inputs, max_batch_size: int) -> dict[str, str]:
    """TensorRT optimisation profiles from the config: the batch dimension from 1 (min) to
    max_batch_size (opt and max). Empty when another dimension is variable: no profile can be
    written for it, and TensorRT builds for the shapes it meets."""
    if not max_batch_size or any(dim == -1 for spec in inputs for dim in spec.shape[1:]):
        return {}

    def shapes(batch: int) -> str:
        return ",".join(f"{spec.name}:{'x'.join(str(d) for d in (batch, *spec.shape[1:]))}" for spec in inputs)

    return {
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(max_batch_size),
        "trt_profile_max_shapes": shapes(max_batch_size),
    }


def library_unloadable(provider_library: Path) -> str:
    """Why an onnxruntime provider library cannot be loaded into this process; "" when it can."""
    if not provider_library.exists():
        return f"this onnxruntime has no {provider_library.name} (the CPU-only wheel, or a build without it)"
    try:
        ctypes.CDLL(str(provider_library))
    except OSError as err:  # the loader names the library it could not find: libcuda.so.1, libnvinfer.so.10
        return f"{provider_library.name} cannot be loaded: {err}"
    return ""


def provider_unavailable_reason(provider_library: Path, gpus: int) -> str:
    """Why an onnxruntime GPU provider cannot run here, in the dynamic loader's or NVML's words."""
    if reason := library_unloadable(provider_library):
        return reason
    if gpus == 0:
        return "no NVIDIA GPU is visible (NVML reports none, or no driver is mounted)"
    return "onnxruntime chose another provider; its log above says why"


def engine_cache_dir(base: Path, model_path: Path, hardware: str, runtime_version: str) -> Path:
    """A TensorRT cache directory of its own for this model file, onnxruntime and GPU. onnxruntime
    names engines by the graph, not by its weights, and does not check its own or TensorRT's version
    or the GPU: a changed model would load a stale engine. Blocking (hashes the file)."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", hardware).strip("-") or "unknown-gpu"
    directory = base / f"{model_path.stem}-{digest.hexdigest()[:16]}-ort{runtime_version}-{gpu}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory
