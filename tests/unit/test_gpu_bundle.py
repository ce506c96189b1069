"""bench/gpu_bundle.py with stand-in wheels built here: the parts it cuts, the parts it refuses, and a
build and install through pip into a fresh virtual environment, all without a network."""

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from bench import gpu_bundle

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A real wheel: the files, METADATA, WHEEL and a RECORD with their hashes, stored uncompressed so
    its size is the payload's."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
    )
    entries = {
        **files,
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},sha256={_record_hash(data)},{len(data)}\n" for path, data in entries.items())
    entries[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for member, data in entries.items():
            wheel.writestr(member, data)
    return path


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def fake_onnxruntime(folder: Path, name: str, version: str) -> Path:
    """Both onnxruntime distributions own the one onnxruntime/ package, as the real ones do."""
    module = f"__version__ = {version!r}\n\ndef get_available_providers():\n    return [{name!r}]\n"
    return make_wheel(folder, name, version, {"onnxruntime/__init__.py": module.encode()})


def run_bundle(*arguments: str, python: str = sys.executable, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "bench.gpu_bundle", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs
    )


def small_bundle(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two wheels across several 4 KiB parts, the first ending inside a part."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    built = [
        make_wheel(
            wheels, "standin", "1.0", {"standin/__init__.py": b"VALUE = 42\n", "standin/data.bin": payload(9 * KIB, 1)}
        ),
        make_wheel(wheels, "standin_extra", "2.0", {"standin_extra/data.bin": payload(5 * KIB, 2)}),
    ]
    gpu_bundle.split(built, ["standin==1.0"], tmp_path / "bundle", 4 * KIB)
    return tmp_path / "bundle", built


def test_parts_are_bounded_and_join_back_to_the_same_wheels(tmp_path):
    bundle, built = small_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    parts = sorted(bundle.glob("part-*"))
    assert [p.name for p in parts] == [f"part-{i:03d}" for i in range(len(parts))] and len(parts) >= 4
    assert all(p.stat().st_size <= 4 * KIB for p in parts)
    assert sum(p.stat().st_size for p in parts) == manifest["total_bytes"] == sum(w.stat().st_size for w in built)
    assert [w["file"] for w in manifest["wheels"]] == [w.name for w in built]
    assert manifest["wheels"][0]["start"] == 0 and manifest["wheels"][0]["end"] == manifest["wheels"][1]["start"]
    assert manifest["wheels"][0]["end"] % (4 * KIB) != 0  # the second wheel starts inside a part
    joined = tmp_path / "joined"
    joined.mkdir()
    out = gpu_bundle.join(gpu_bundle.check_parts(bundle, manifest), manifest, joined)
    assert [gpu_bundle.sha256(p) for p in out] == [hashlib.sha256(w.read_bytes()).hexdigest() for w in built]


def test_a_rebuild_leaves_no_stale_parts(tmp_path):
    bundle, built = small_bundle(tmp_path)
    gpu_bundle.split(built[1:], [], bundle, 4 * KIB)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(p.name for p in bundle.glob("part-*")) == [part["file"] for part in manifest["parts"]]


def test_a_missing_part_is_named_and_refused(tmp_path):
    bundle, _ = small_bundle(tmp_path)
    (bundle / "part-001").unlink()
    result = run_bundle("--install", "--dry-run", str(bundle))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "part-001: missing" in result.stderr and "part-000" not in result.stderr


def test_a_damaged_part_is_named_and_refused(tmp_path):
    bundle, _ = small_bundle(tmp_path)
    part = bundle / "part-002"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    result = run_bundle("--install", "--dry-run", str(bundle))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "part-002:" in result.stderr and "part-001" not in result.stderr and "part-003" not in result.stderr
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    assert run_bundle("--install", "--dry-run", str(bundle)).returncode == 0


def test_build_and_install_into_a_fresh_environment(tmp_path):
    """pip download gathers the closure from a local folder instead of PyPI (PIP_NO_INDEX,
    PIP_FIND_LINKS), drops the skipped numpy; the install replaces a CPU onnxruntime installed beside
    the GPU one, and takes standin's dependency from the bundle."""
    index = tmp_path / "index"
    index.mkdir()
    standin = {"standin/__init__.py": b"VALUE = 42\n", "standin/data.bin": payload(9 * KIB, 1)}
    make_wheel(index, "standin", "1.0", standin, requires=("standin-extra>=2", "numpy"))
    make_wheel(
        index, "standin_extra", "2.0", {"standin_extra/__init__.py": b"", "standin_extra/data.bin": payload(5 * KIB, 2)}
    )
    make_wheel(index, "numpy", "0.0.1", {"numpy/__init__.py": b""})
    cpu, gpu = fake_onnxruntime(index, "onnxruntime", "1.0"), fake_onnxruntime(index, "onnxruntime_gpu", "1.31.1")
    bundle = tmp_path / "bundle"
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)}
    requirements = ("--requirements", "standin==1.0", "onnxruntime-gpu==1.31.1")
    built = run_bundle(str(bundle), "--part-mib", str(4 / 1024), *requirements, env=pip_env)
    assert built.returncode == 0, built.stdout + built.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    carried = [gpu_bundle.wheel_name(wheel["file"])[0] for wheel in manifest["wheels"]]
    assert carried == ["onnxruntime-gpu", "standin", "standin-extra"]  # not numpy
    assert len(manifest["parts"]) >= 4 and all(part["size"] <= 4 * KIB for part in manifest["parts"])
    assert "3 wheels, " in built.stdout and f"in {len(manifest['parts'])} parts" in built.stdout

    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = str(environment / "bin" / "python")
    preinstall = [python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "--no-deps"]
    numpy = index / "numpy-0.0.1-py3-none-any.whl"
    subprocess.run([*preinstall, str(cpu), str(gpu), str(numpy)], check=True, capture_output=True)

    installed = run_bundle("--install", str(bundle), python=python)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "onnxruntime 1.31.1 (onnxruntime-gpu 1.31.1), providers: ['onnxruntime_gpu']" in installed.stdout
    probe = (
        "import importlib.metadata as m, standin, standin_extra\n"
        "print(standin.VALUE, sorted(d.metadata['Name'] for d in m.distributions()))"
    )
    found = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert found.startswith("42 ") and "'onnxruntime'" not in found and "'onnxruntime_gpu'" in found
    assert gpu_bundle.onnxruntime_report(python, "9.9.9") == 1
