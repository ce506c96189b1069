#!/usr/bin/env bash
# Set up Seldon MLServer, the benchmark's peer, in its own virtual environment:
#
#     bench/mlserver/setup.sh              # creates bench/.venv-mlserver (idempotent)
#     PYTHON=python3.11 bench/mlserver/setup.sh
#     MLSERVER_SPEC='mlserver==1.7.1' ONNXRUNTIME_SPEC='onnxruntime==1.31.1' bench/mlserver/setup.sh
#
# MLServer gets a venv of its own because it pins grpcio, protobuf, fastapi, pydantic... to
# ranges that need not agree with onnxserve's. Installs the newest `mlserver` pip can resolve
# for this Python (1.7.x for 3.11), the CPU `onnxruntime` wheel and numpy; nothing else is
# needed by bench/mlserver/onnx_runtime.py. Re-running skips the install when all three
# import (and uvloop is below 0.22, see below); delete the venv (or set FORCE=1) to reinstall. Prints the installed versions.
#
# uvloop is held below 0.22: with uvloop 0.22+ MLServer 1.7.1's inference workers die at start
# ("There is no current event loop in thread 'MainThread'" in parallel/worker.py
# _ignore_signals; SeldonIO/MLServer#2286, fix in PR #2285 unreleased), so any
# parallel_workers >= 1, MLServer's default, fails to load models. serve.py uses 0 anyway.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(cd "$HERE/.." && pwd)/.venv-mlserver"
PYTHON="${PYTHON:-python3}"
MLSERVER_SPEC="${MLSERVER_SPEC:-mlserver}"
ONNXRUNTIME_SPEC="${ONNXRUNTIME_SPEC:-onnxruntime}"  # e.g. onnxruntime==1.31.1 to match onnxserve's
PY="$VENV/bin/python"

check() {
    "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as md
import mlserver, numpy, onnxruntime  # noqa: F401  (all three import)
try:
    assert tuple(int(p) for p in md.version("uvloop").split(".")[:2]) < (0, 22), "uvloop too new"
except md.PackageNotFoundError:
    pass
names = ("mlserver", "onnxruntime", "numpy", "grpcio", "protobuf", "fastapi", "uvicorn", "uvloop", "pydantic")
for name in names:
    try:
        print(f"  {name:12} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
}

if [[ -x "$PY" && "${FORCE:-0}" != 1 ]] && versions="$(check)"; then
    echo "MLServer venv already set up: $VENV"
    echo "$versions"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$PY" ]]; then
    echo "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$MLSERVER_SPEC" "$ONNXRUNTIME_SPEC" numpy "uvloop<0.22"
versions="$(check)" || { echo "install finished but mlserver/onnxruntime/numpy do not import" >&2; exit 1; }
echo "MLServer venv ready in $(( $(date +%s) - start )) s: $VENV"
echo "$versions"
