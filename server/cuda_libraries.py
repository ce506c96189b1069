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
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
    messages = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
    messages += [str(warning.message) for warning in caught]
    return messages + _preload_tensorrt()


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
