"""What onnxruntime can do with a GPU here, as JSON: which libraries its CUDA and TensorRT providers
still lack once NVIDIA's pip-installed libraries are preloaded (server/engine/cuda_libraries.py, as the
server does at start), what the preloading said, and what happens when a CUDA session is asked for.

    python -m server.tools.gpu_report [MODEL.onnx]

The image test and the `[cuda]` install test run it where only the driver (libcuda.so.1, which the
NVIDIA container runtime or the host provides) may be missing; an operator runs it in a pod that
will not use its GPU."""

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from server.engine import cuda_libraries
from server.engine.placement import CUDA, PROVIDER_LIBRARIES, visible_gpus
from server.engine.providers import provider_unavailable_reason


def missing_libraries(library: Path) -> list[str]:
    """The shared libraries `library` needs that this process cannot load: those ldd does not find
    on the loader's paths, less those already loaded here under that soname (preloaded), which the
    loader reuses when the provider is opened."""
    if not library.exists():
        return [library.name]
    listed = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False).stdout
    unresolved = sorted({line.split()[0] for line in listed.splitlines() if "not found" in line})
    return [name for name in unresolved if not _loadable(name)]


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)  # found by soname among the libraries this process already loaded
    except OSError:
        return False
    return True


@contextlib.contextmanager
def native_stderr():
    """onnxruntime's C++ log goes to file descriptor 2: collect it (the yielded list fills on exit)."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink if line.strip())


def cuda_session(model: Path) -> dict:
    """The providers a session that asks for CUDA really gets, and onnxruntime's words on why."""
    with native_stderr() as log:
        session = ort.InferenceSession(str(model), providers=[CUDA, "CPUExecutionProvider"])
    return {"providers": session.get_providers(), "log": log}


def report(model: Path | None) -> dict:
    preloaded = cuda_libraries.preload()  # before the checks below, as the server does at start
    gpus = visible_gpus()
    found = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "gpus_visible": gpus,
        "libraries": {
            name: {"path": str(path), "missing": missing_libraries(path)} for name, path in PROVIDER_LIBRARIES.items()
        },
        "preload": preloaded,
        "cuda_unavailable_because": provider_unavailable_reason(PROVIDER_LIBRARIES[CUDA], gpus),
    }
    if model is not None:
        found["cuda_session"] = cuda_session(model)
    return found


def _default_model() -> Path | None:
    root = Path(os.environ.get("ONNXSERVE_MODEL_REPOSITORY", "models"))
    return next(iter(sorted(root.glob("*/*/model.onnx"))), None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    model = Path(args[0]) if args else _default_model()
    print(json.dumps(report(model), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
