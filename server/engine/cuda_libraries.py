"""NVIDIA's libraries, loaded where onnxruntime-gpu's providers will find them.

onnxruntime-gpu's CUDA provider links libcublasLt, libcublas, libcurand and libcudart (and loads
cuDNN at run time), and its TensorRT provider links libnvinfer and libnvonnxparser, but neither
library carries a RUNPATH: installed from pip (`pip install 'onnxserve[cuda]'`, NVIDIA's wheels
under site-packages/nvidia/), they are found only when something loads them into the process first.
`onnxruntime.preload_dlls()` does that for CUDA and cuDNN; TensorRT's wheel (`tensorrt-cu13-libs`,
package `tensorrt_libs`) it leaves alone, so it is loaded here. Once a library with a given soname
is in the process, the dynamic loader resolves every later reference to that soname with it, which
is why no LD_LIBRARY_PATH is needed."""

import contextlib
import ctypes
import importlib.util
import io
import warnings
from pathlib import Path

import onnxruntime as ort

# Loaded in this order: a library's own dependencies first (libnvinfer before its ONNX parser).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
CUDNN = "libcudnn.so.9"


def cuda_build() -> str:
    """The CUDA version this onnxruntime was built with; "" for a CPU-only build."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:  # a build without the module: treat as CPU-only
        return ""
    return getattr(build_and_package_info, "cuda_version", "") or ""


def preload() -> list[str]:
    """Load the CUDA, cuDNN and TensorRT libraries that are installed into this process, before any
    session opens. Returns what could not be loaded, in onnxruntime's and the loader's words (empty
    when everything installed loaded, and for a CPU-only onnxruntime). Safe to call more than once."""
    if not cuda_build():
        return []
    messages = _preload_dlls()
    if messages:  # onnxruntime looks beside itself only: NVIDIA's wheels may sit in another site folder
        if (retried := _preload_from_nvidia_folders()) is not None:  # [] when they loaded from there
            messages = retried
    return messages + _check_cudnn() + _preload_tensorrt()


def _preload_dlls(**where) -> list[str]:
    """onnxruntime.preload_dlls(), which prints what it could not load: those lines."""
    printed = io.StringIO()
    with (
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(printed),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        ort.preload_dlls(msvc=False, **where)
    messages = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
    return messages + [str(warning.message) for warning in caught]


def _preload_from_nvidia_folders() -> list[str] | None:
    """preload_dlls() pointed at each folder of the `nvidia` namespace package (cu13/lib, cudnn/lib);
    None where there is none to try. Its messages when it still failed, [] when it loaded them."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(root) for root in (spec.submodule_search_locations or [])] if spec else []
    cuda = [root / f"cu{cuda_build().split('.')[0]}" / "lib" for root in roots]
    cudnn = [root / "cudnn" / "lib" for root in roots]
    cuda, cudnn = [path for path in cuda if path.is_dir()], [path for path in cudnn if path.is_dir()]
    if not cuda:
        return None
    messages = _preload_dlls(cuda=True, cudnn=False, directory=str(cuda[0]))
    if cudnn:
        messages += _preload_dlls(cuda=False, cudnn=True, directory=str(cudnn[0]))
    return messages


def _check_cudnn() -> list[str]:
    """preload_dlls() takes cuDNN as optional and says nothing when it fails, and the CUDA provider
    loads it only at its first convolution: a model would load, then fail every request."""
    try:
        ctypes.CDLL(CUDNN)
    except OSError as err:
        return [f"Failed to load {CUDNN} (cuDNN 9, which convolutions need): {err}"]
    return []


def tensorrt_directory() -> Path | None:
    """Where the `tensorrt_libs` wheel put TensorRT's libraries; None where it is not installed."""
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _preload_tensorrt() -> list[str]:
    directory = tensorrt_directory()
    if directory is None:
        return []  # TensorRT is optional: its provider's report names libnvinfer as missing
    failures = []
    for name in TENSORRT_LIBRARIES:
        path = directory / name
        if not path.exists():
            continue  # libnvinfer_plugin is optional; the linked ones show up as missing in the report
        try:
            ctypes.CDLL(str(path))
        except OSError as err:
            failures.append(f"Failed to load {path}: {err}")
    return failures
