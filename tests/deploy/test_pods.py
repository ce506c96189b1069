"""The rendered Kubernetes Deployment run as a real pod with `podman kube play`: the
CI-built image, the manifest's user, read-only root filesystem, dropped capabilities,
volumes and ports; then gRPC health and /metrics on the published ports.

podman honours the pod spec but not Services, HPAs or `grpc:` probes, and 4.3 publishes
container ports on the host, so the test runs one replica on free loopback ports."""

import os
import shutil
import subprocess
import urllib.request

import grpc
import pytest
import yaml

from server.healthcheck import check
from tests.conftest import wait_until
from tests.deploy.conftest import IMAGE, ROOT, WORKDIR
from tests.prometheus import free_port

# podman 4.3 on this kernel: runc (crun refuses hybrid cgroups) and limits at or below the host's.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=16384:16384"]
[engine]
runtime = "runc"
"""
PODMAN_IMAGE = f"localhost/{IMAGE}"


def podman(*args: str, check_rc: bool = True, **kwargs) -> subprocess.CompletedProcess:
    conf = WORKDIR / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    command = ["podman", f"--root={WORKDIR / 'podman' / 'root'}", f"--runroot={WORKDIR / 'podman' / 'run'}", *args]
    result = subprocess.run(
        command, env={**os.environ, "CONTAINERS_CONF": str(conf)}, capture_output=True, text=True, timeout=600, **kwargs
    )
    if check_rc and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def podman_image(docker):
    if shutil.which("podman") is None or shutil.which("runc") is None or shutil.which("catatonit") is None:
        pytest.skip("needs podman, runc and catatonit (apt-get install podman runc catatonit; .ci/run does)")
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl for `kubectl kustomize`")
    built = docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip().removeprefix("sha256:")
    loaded = podman("image", "inspect", "--format", "{{.Id}}", PODMAN_IMAGE, check_rc=False).stdout.strip()
    if loaded != built:
        with subprocess.Popen([docker.client, "save", IMAGE], env=docker.environment, stdout=subprocess.PIPE) as saved:
            podman("load", stdin=saved.stdout)
        assert saved.returncode == 0
    return PODMAN_IMAGE


def rendered_deployment(overlay: str) -> dict:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "kubernetes" / "overlays" / overlay)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return next(doc for doc in yaml.safe_load_all(rendered.stdout) if doc and doc["kind"] == "Deployment")


def pod_spec_for_podman(deployment: dict, image: str) -> tuple[dict, dict[str, int]]:
    """One replica of the CI image, container ports published on free loopback ports.
    Everything else (user, securityContext, volumes, env, ports) is the manifest's own."""
    deployment["spec"]["replicas"] = 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["image"], container["imagePullPolicy"] = image, "Never"
    container.pop("resources", None)  # a 2-core CI machine cannot grant the manifest's requests
    published = {}
    for port in container["ports"]:
        port["hostIP"], port["hostPort"] = "127.0.0.1", free_port()
        published[port["name"]] = port["hostPort"]
    return deployment, published


def test_cpu_deployment_runs_as_a_real_pod(podman_image, tmp_path):
    deployment, published = pod_spec_for_podman(rendered_deployment("cpu"), podman_image)
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    container_name = f"{deployment['metadata']['name']}-pod-0-{deployment['spec']['template']['spec']['containers'][0]['name']}"
    podman("kube", "play", "--replace", str(manifest))
    try:
        grpc_address = f"127.0.0.1:{published['grpc']}"

        def serving() -> bool:
            try:
                return check(grpc_address, "", timeout=2) == "SERVING"
            except grpc.RpcError:  # not listening yet; the wait reports the logs if it never is
                return False

        assert wait_until(serving, timeout=60), podman("logs", container_name, check_rc=False).stderr
        assert check(grpc_address, "liveness", timeout=2) == "SERVING"
        url = f"http://127.0.0.1:{published['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert 'onnxserve_model_ready{model="mlp",provider="CPUExecutionProvider",version="1"} 1.0' in response.read().decode()

        probe = podman("exec", container_name, "sh", "-c", "id -u; touch /tmp/scratch && echo tmp-writable; touch /x",
                       check_rc=False)  # fmt: skip
        assert probe.stdout.split() == ["10001", "tmp-writable"]
        assert "Read-only file system" in probe.stderr
        capabilities = podman("exec", container_name, "grep", "CapEff", "/proc/self/status").stdout.split()[-1]
        assert int(capabilities, 16) == 0, "every capability is dropped"
    finally:
        podman("kube", "down", str(manifest), check_rc=False)
