"""A real Docker engine for the deployment tests: Debian's dockerd on a scratch data root,
the `python:3.11-slim` base built locally from Debian's archive (no image registry is
reachable here), and our image built from the project's Dockerfile, unchanged."""

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "onnxserve:test"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
WORKDIR = Path(tempfile.gettempdir()) / "onnxserve-docker"  # kept between runs: layers are cached
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # a TLS-intercepting proxy's CA lives here


@dataclass
class Docker:
    client: str
    environment: dict

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.client, *args], env=self.environment, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result


def _tools() -> tuple[str, str]:
    dockerd = shutil.which("dockerd")
    if dockerd is None or shutil.which("mmdebstrap") is None:
        pytest.skip("needs Debian's docker.io and mmdebstrap (apt-get install docker.io mmdebstrap; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    # The client that ships with this engine (dockerd in /usr/sbin, docker in /usr/bin): a newer
    # client elsewhere on PATH may want buildx for BuildKit builds.
    shipped = [Path(dockerd).parent / "docker", Path("/usr/bin/docker")]
    client = next((str(path) for path in shipped if path.exists()), shutil.which("docker"))
    if client is None:
        pytest.skip("no docker client next to dockerd")
    return dockerd, client


def _start_daemon(dockerd: str, docker: Docker) -> subprocess.Popen | None:
    if docker("info", check=False, timeout=30).returncode == 0:
        return None  # one from an earlier run is still up
    WORKDIR.mkdir(exist_ok=True)
    log = (WORKDIR / "dockerd.log").open("w")
    daemon = subprocess.Popen(
        [
            dockerd,
            f"--data-root={WORKDIR / 'data'}",
            f"--exec-root={WORKDIR / 'exec'}",
            f"--host=unix://{WORKDIR / 'docker.sock'}",
            f"--pidfile={WORKDIR / 'dockerd.pid'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 60
    while docker("info", check=False, timeout=30).returncode != 0:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("dockerd did not start:\n" + (WORKDIR / "dockerd.log").read_text()[-3000:])
        time.sleep(0.5)
    return daemon


def _base_image(docker: Docker) -> None:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    tarball = WORKDIR / "base.tar"
    if not tarball.exists():
        subprocess.run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python-is-python3,ca-certificates,passwd",
                "bookworm",
                str(tarball),
                "http://deb.debian.org/debian",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    docker("import", "--change", 'CMD ["python3"]', str(tarball), BASE_IMAGE)


@pytest.fixture(scope="session")
def docker() -> Docker:
    dockerd, client = _tools()
    environment = {**os.environ, "DOCKER_HOST": f"unix://{WORKDIR / 'docker.sock'}", "DOCKER_BUILDKIT": "1"}
    engine = Docker(client, environment)
    daemon = _start_daemon(dockerd, engine)
    _base_image(engine)
    secret = ["--secret", f"id=ca,src={HOST_CA}"] if HOST_CA.exists() else []
    engine("build", *secret, "--tag", IMAGE, str(ROOT), timeout=1800)
    # The images this tag named before are dangling now: left, they filled a developer's disk (40 GB
    # over a day of runs, then "unexpected EOF" as a build exported its layers). The layer cache stays.
    engine("image", "prune", "--force")
    # So does BuildKit's cache of superseded layers (55 GB on a developer's disk): the newest 8 GB stay.
    engine("builder", "prune", "--force", "--keep-storage", "8GB")
    yield engine
    if daemon is not None:
        daemon.terminate()
        daemon.wait(60)
