"""Carry the wheels the lent GPU machine lacks, in parts small enough to send one per command, and
install them there without a network:

    python -m bench.gpu_bundle .gpu-bundle                       # here, with PyPI
    python -m bench.gpu_bundle --install .gpu-bundle             # there, with the Python that runs the check
    python -m bench.gpu_bundle --install --dry-run .gpu-bundle   # join and verify only; pip is not run

That machine (Linux x86-64, CPython 3.12, no network) has torch, CUDA 13's wheels, numpy, onnx and a
CPU-only onnxruntime, but not onnxruntime-gpu, grpcio-health-checking, grpcio-reflection, uvicorn,
httptools, orjson or setproctitle. Files reach it in pieces of at most 64 MiB per command, so the wheels are laid
end to end in one stream cut into parts of at most 60 MiB (part-000, part-001, ...); manifest.json
gives each wheel's byte range and SHA-256 and each part's, so a part lost or damaged on the way is
named before pip runs. The install side needs only the standard library and pip.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONNXRUNTIME_GPU = "onnxruntime-gpu==1.31.1"  # a CUDA 13 build, like the machine's NVIDIA wheels and torch
WANTED = (
    "grpcio-health-checking",
    "grpcio-reflection",
    "uvicorn",
    "httptools",
    "orjson",
    "setproctitle",
)  # at this venv's versions
# In the closure, but the GPU machine has it (PyTorch needs it) at a version onnxruntime-gpu accepts
# (numpy>=1.21.6), and it alone would cost 16 MB of parts. Everything else comes along, if only a few
# hundred KiB: an offline pip stops at the first requirement it cannot find, and grpcio and protobuf
# must be new enough for the health and reflection wheels' generated modules.
SKIP = frozenset({"numpy"})
# pip matches --platform exactly, so every manylinux tag the machine accepts is listed. torch 2.11's
# wheels are manylinux_2_28, so its glibc is at least 2.28; nothing newer is assumed.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "any",
)
TARGET = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312")
MANIFEST = "manifest.json"
BLOCK = 1 << 20


class BundleError(Exception):
    """A part or wheel is missing or does not match the manifest (exit status 2)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path | str) -> tuple[str, str]:
    """(canonical project name, version) from a wheel's file name (name-version-...-platform.whl)."""
    name, version = Path(path).name.split("-")[:2]
    return canonical(name), version


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def installed() -> dict[str, str]:
    """{canonical name: version} of the running Python's distributions."""
    return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def default_requirements() -> list[str]:
    """What CI tests: the versions this project's environment resolved, onnxruntime-gpu pinned."""
    return [ONNXRUNTIME_GPU, *(f"{name}=={importlib.metadata.version(name)}" for name in WANTED)]


def _constraints(requirements: list[str]) -> str:
    """Pins for the closure's other members (grpcio, protobuf, ...) at the versions installed here,
    so pip download does not take whatever is newest. Requested and skipped names are left free."""
    free = SKIP | {canonical(re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0]) for r in requirements}
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed().items()) if name not in free)


def gather(requirements: list[str], into: Path) -> list[Path]:
    """pip download the closure for the GPU machine's interpreter and platform (not this one's) into
    `into`; the wheels to carry, SKIP dropped, in file-name order."""
    constraints = into / "constraints.txt"
    constraints.write_text(_constraints(requirements))
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--quiet",
        *TARGET,
        *platforms,
        "--dest",
        str(into),
        "-c",
        str(constraints),
        *requirements,
    ]
    subprocess.run(command, check=True)
    wheels = sorted(into.glob("*.whl"))
    return [wheel for wheel in wheels if wheel_name(wheel)[0] not in SKIP]


def _read(files: list[Path], start: int, end: int):
    """Blocks of bytes start..end of the files laid end to end: the parts are read out of the wheels
    this way, and each wheel back out of the parts."""
    offset = 0
    for path in files:
        size = path.stat().st_size
        if offset < end and start < offset + size:
            with path.open("rb") as file:
                file.seek(max(0, start - offset))
                left = min(end, offset + size) - max(start, offset)
                while left > 0 and (block := file.read(min(BLOCK, left))):
                    left -= len(block)
                    yield block
        offset += size


def _write(path: Path, blocks) -> tuple[int, str]:
    """Writes the blocks to `path`; (size, SHA-256) of what was written, so nothing is read twice."""
    size, digest = 0, hashlib.sha256()
    with path.open("wb") as file:
        for block in blocks:
            file.write(block)
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def split(wheels: list[Path], requirements: list[str], bundle: Path, part_bytes: int) -> dict:
    """Lay the wheels end to end, cut the stream into parts of at most `part_bytes` in `bundle`, and
    write manifest.json; earlier parts there go first, so none is left over from a bigger bundle."""
    bundle.mkdir(parents=True, exist_ok=True)
    for stale in [*bundle.glob("part-*"), bundle / MANIFEST]:
        stale.unlink(missing_ok=True)
    entries, offset = [], 0
    for wheel in wheels:
        size = wheel.stat().st_size
        entries.append(
            {"file": wheel.name, "size": size, "sha256": sha256(wheel), "start": offset, "end": offset + size}
        )
        offset += size
    parts = []
    for index, start in enumerate(range(0, offset, part_bytes)):
        size, digest = _write(bundle / f"part-{index:03d}", _read(wheels, start, min(offset, start + part_bytes)))
        parts.append({"file": f"part-{index:03d}", "size": size, "sha256": digest})
    manifest = {
        "requirements": requirements,
        "part_bytes": part_bytes,
        "total_bytes": offset,
        "wheels": entries,
        "parts": parts,
    }
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_parts(bundle: Path, manifest: dict) -> list[Path]:
    """Every part present with its size and SHA-256, or BundleError naming each one that is not."""
    problems = []
    for part in manifest["parts"]:
        path = bundle / part["file"]
        if not path.is_file():
            problems.append(f"{part['file']}: missing")
            continue
        size, digest = path.stat().st_size, sha256(path)
        if (size, digest) != (part["size"], part["sha256"]):
            problems.append(
                f"{part['file']}: {size} bytes, SHA-256 {digest}; the manifest says {part['size']} bytes, "
                f"{part['sha256']}"
            )
    if problems:
        raise BundleError("parts that do not match the manifest (send them again):\n  " + "\n  ".join(problems))
    return [bundle / part["file"] for part in manifest["parts"]]


def join(parts: list[Path], manifest: dict, into: Path) -> list[Path]:
    """Each wheel's byte range of the parts' stream, written out and checked against its SHA-256."""
    for wheel in manifest["wheels"]:
        _, digest = _write(into / wheel["file"], _read(parts, wheel["start"], wheel["end"]))
        if digest != wheel["sha256"]:
            raise BundleError(f"{wheel['file']}: joined, its SHA-256 is {digest}, not the manifest's {wheel['sha256']}")
    return [into / wheel["file"] for wheel in manifest["wheels"]]


@contextlib.contextmanager
def step(what: str):
    """Prints how long `what` took: time on the lent machine is counted, and this says where it went."""
    began = time.perf_counter()
    yield
    print(f"{what}: {time.perf_counter() - began:.1f} s", flush=True)


def bundled_version(manifest: dict, name: str) -> str | None:
    return next((wheel_name(w["file"])[1] for w in manifest["wheels"] if wheel_name(w["file"])[0] == name), None)


def _pip(*arguments: str) -> None:
    # A distribution's own Python (PEP 668) refuses pip installs unless told; a throwaway machine allows it.
    environment = {**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", *arguments, "--disable-pip-version-check"], check=True, env=environment
    )


def pip_install(manifest: dict, wheel_dir: Path) -> None:
    """Into the running Python, from the joined wheels only: pip keeps what is installed where it
    satisfies the pins and the wheels' own requirements, and takes the rest from the bundle. The
    CPU-only onnxruntime owns the same onnxruntime/ directory as onnxruntime-gpu, so it goes first;
    removing it deletes files an installed onnxruntime-gpu shares, which is then reinstalled."""
    gpu, present = bundled_version(manifest, "onnxruntime-gpu"), installed()
    reinstall = bool(gpu and "onnxruntime" in present and "onnxruntime-gpu" in present)
    if gpu and "onnxruntime" in present:
        _pip("uninstall", "--yes", "onnxruntime")
    source = ("--no-index", "--find-links", str(wheel_dir))
    _pip("install", *source, *manifest["requirements"])
    if reinstall:
        _pip("install", *source, "--force-reinstall", "--no-deps", f"onnxruntime-gpu=={gpu}")


PROBE = """import importlib.metadata, json, onnxruntime
try:
    gpu = importlib.metadata.version("onnxruntime-gpu")
except importlib.metadata.PackageNotFoundError:
    gpu = None
print(json.dumps({"version": onnxruntime.__version__, "onnxruntime-gpu": gpu,
                  "providers": onnxruntime.get_available_providers()}))"""


def onnxruntime_report(python: str, expected: str | None) -> int:
    """Imports onnxruntime in a fresh `python` (this process may hold stale modules) and prints its
    version and providers; 1 where onnxruntime-gpu is not `expected` (None: nothing is expected)."""
    probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True)
    if probe.returncode:
        print(f"onnxruntime does not import:\n{probe.stderr.strip()}")
        return 1 if expected else 0
    found = json.loads(probe.stdout)
    print(
        f"onnxruntime {found['version']} (onnxruntime-gpu {found['onnxruntime-gpu']}), providers: {found['providers']}"
    )
    if expected and not found["version"] == found["onnxruntime-gpu"] == expected:
        print(f"expected onnxruntime-gpu {expected}, the bundled one")
        return 1
    return 0


def build(bundle: Path, requirements: list[str], part_bytes: int) -> None:
    """The download goes to a scratch folder: only the parts and the manifest are meant to travel."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as download:
        with step("download"):
            wheels = gather(requirements, Path(download))
        with step("split"):
            manifest = split(wheels, requirements, bundle, part_bytes)
    for wheel in manifest["wheels"]:
        print(f"  {wheel['file']}: {wheel['size'] / 2**20:.2f} MiB")
    sizes = ", ".join(f"{part['size'] / 2**20:.1f}" for part in manifest["parts"])
    print(
        f"{len(manifest['wheels'])} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB in {len(manifest['parts'])} "
        f"parts ({sizes} MiB) in {bundle}, {time.perf_counter() - began:.1f} s"
    )


def install(bundle: Path, dry_run: bool) -> int:
    """Nothing reaches pip unless every part and wheel matches the manifest; the wheels are joined in
    a scratch folder, so the bundle's folder holds only what was sent."""
    began = time.perf_counter()
    if not (bundle / MANIFEST).is_file():
        raise BundleError(f"{MANIFEST}: missing")
    manifest = json.loads((bundle / MANIFEST).read_text())
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as joined:
        with step(f"check {len(manifest['parts'])} parts"):
            parts = check_parts(bundle, manifest)
        with step(f"join {len(manifest['wheels'])} wheels"):
            join(parts, manifest, Path(joined))
        if dry_run:
            print(f"dry run: {time.perf_counter() - began:.1f} s; nothing installed")
            return 0
        with step("pip install"):
            pip_install(manifest, Path(joined))
    status = onnxruntime_report(sys.executable, bundled_version(manifest, "onnxruntime-gpu"))
    print(f"install: {time.perf_counter() - began:.1f} s")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        "python -m bench.gpu_bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path, help="the folder of parts and manifest.json")
    parser.add_argument("--install", action="store_true", help="check, join and install the bundle (offline)")
    parser.add_argument("--dry-run", action="store_true", help="with --install: check and join only")
    parser.add_argument("--part-mib", type=float, default=60, help="largest part, MiB (default 60)")
    parser.add_argument("--requirements", nargs="+", help="what to gather instead of onnxserve's missing wheels")
    args = parser.parse_args(argv)
    try:
        if args.install:
            return install(args.bundle, args.dry_run)
        build(args.bundle, args.requirements or default_requirements(), max(1, int(args.part_mib * 2**20)))
    except BundleError as error:
        print(f"{args.bundle}: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"failed: {' '.join(error.cmd)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
