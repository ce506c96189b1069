"""What onnxruntime can do with a GPU here, as JSON: which libraries its CUDA and TensorRT providers
lack, what `preload_dlls()` says, and what happens when a CUDA session is asked for.

    python -m server.gpu_report [MODEL.onnx]

The image test runs it inside the image, where only the driver (libcuda.so.1, which the NVIDIA
container runtime mounts) may be missing; an operator runs it in a pod that will not use its GPU."""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from server.providers import provider_unavailable_reason
from server.placement import CUDA, PROVIDER_LIBRARIES, visible_gpus


def missing_libraries(library: Path) -> list[str]:
    """The shared libraries `library` needs that the dynamic loader cannot find (ldd's "not found")."""
    if not library.exists():
        return [library.name]
    listed = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False).stdout
    return sorted({line.split()[0] for line in listed.splitlines() if "not found" in line})


def preload_messages() -> list[str]:
    """What onnxruntime.preload_dlls() prints about CUDA and cuDNN libraries it could not load."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
    return [line for line in printed.getvalue().splitlines() if line.strip()]


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
    gpus = visible_gpus()
    found = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "gpus_visible": gpus,
        "libraries": {name: {"path": str(path), "missing": missing_libraries(path)} for name, path in PROVIDER_LIBRARIES.items()},
        "preload": preload_messages(),
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
