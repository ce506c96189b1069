#!/usr/bin/env bash
# Set up NVIDIA PyTriton, the benchmark's peer, in its own virtual environment:
#
#     bench/pytriton/setup.sh              # creates bench/.venv-pytriton (idempotent)
#     PYTRITON_SPEC='nvidia-pytriton==0.5.5' ONNXRUNTIME_SPEC='onnxruntime==1.31.1' bench/pytriton/setup.sh
#
# The venv is made with Debian's /usr/bin/python3, not pyenv's or another build: the Triton
# server and Python backend stub bundled in the wheel load the system libpython3.X.so, which
# a statically linked python (pyenv's default) does not match. Installs nvidia-pytriton 0.5.5,
# numpy<2 (with numpy 2, PyTriton 0.5.5 answers empty outputs without any error) and the CPU
# onnxruntime wheel. Re-running skips the install when all three import and numpy is below 2;
# delete the venv (or set FORCE=1) to reinstall. Prints the installed versions.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(cd "$HERE/.." && pwd)/.venv-pytriton"
PYTHON="${PYTHON:-/usr/bin/python3}"
PYTRITON_SPEC="${PYTRITON_SPEC:-nvidia-pytriton==0.5.5}"
ONNXRUNTIME_SPEC="${ONNXRUNTIME_SPEC:-onnxruntime}"  # e.g. onnxruntime==1.31.1 to match onnxserve's
PY="$VENV/bin/python"

check() {
    "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as md
import numpy, onnxruntime, pytriton.triton  # noqa: F401  (all three import)
assert int(numpy.__version__.split(".")[0]) < 2, "numpy 2: PyTriton 0.5.5 answers empty outputs"
for name in ("nvidia-pytriton", "onnxruntime", "numpy", "tritonclient", "pyzmq", "sh"):
    try:
        print(f"  {name:16} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
}

if [[ -x "$PY" && "${FORCE:-0}" != 1 ]] && versions="$(check)"; then
    echo "PyTriton venv already set up: $VENV"
    echo "$versions"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$PY" ]]; then
    echo "creating $VENV with $("$PYTHON" --version 2>&1) ($PYTHON)"
    "$PYTHON" -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$PYTRITON_SPEC" "numpy<2" "$ONNXRUNTIME_SPEC"
versions="$(check)" || { echo "install finished but pytriton/onnxruntime/numpy<2 do not import" >&2; exit 1; }
echo "PyTriton venv ready in $(( $(date +%s) - start )) s: $VENV"
echo "$versions"
