"""The rendered Kubernetes Deployment run as a real pod with `podman kube play`: the
CI-built image, the manifest's user, read-only root filesystem, dropped capabilities,
volumes and ports; then gRPC health and /metrics on the published ports.

podman honours the pod spec but not Services, HPAs or `grpc:` probes, and 4.3 publishes
container ports on the host, so the test runs one replica on free loopback ports. Optional
Secret volumes whose Secret is absent become empty directories here, as the kubelet mounts
them (see absent_optional_secrets_as_empty_dirs).

The tenants example runs too, with TLS, API keys and the usage log turned on: certificates made
with openssl as its cert-manager Certificates describe them, and what podman 4.3 lacks done as
the kubelet would (see tenants_pod_for_podman): then the probes' own commands and requests, a
mutual-TLS client, API keys (and their rotation by replacing the file), /metrics and the usage
log, through the reader and through the shipping sidecar."""

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from server.tools.healthcheck import ProbeTls, check
from tests.certificates import Pair, make_ca, make_leaf
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
        # The image the tag pointed at before is now untagged; each is about 3 GB here. Images
        # that a container still uses are kept.
        podman("image", "prune", "--force", check_rc=False)
    return PODMAN_IMAGE


def rendered(path: str) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "kubernetes" / path)], check=True, capture_output=True, text=True
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered_deployment(overlay: str) -> dict:
    return next(doc for doc in rendered(f"overlays/{overlay}") if doc["kind"] == "Deployment")


def absent_optional_secrets_as_empty_dirs(spec: dict) -> list[str]:
    """The kubelet mounts an empty directory for an optional Secret that does not exist; podman
    4.3.1 cannot: `kube play` stops with `failed to create volume "tls": no secret with name or
    id "onnxserve-tls": no such secret`, and when a podman secret of that name does exist it
    skips the volume altogether (podman issue #16636, fixed in 4.4 by #16637). So each optional
    Secret volume (none of them exists here) becomes what the kubelet would mount: an empty,
    read-only directory. Returns the volumes' names."""
    replaced = []
    for volume in spec["volumes"]:
        if volume.get("secret", {}).get("optional") is True:
            del volume["secret"]
            volume["emptyDir"] = {}
            replaced.append(volume["name"])
    return replaced


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
    assert absent_optional_secrets_as_empty_dirs(deployment["spec"]["template"]["spec"]) == ["tls", "api-keys"]
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    container_name = (
        f"{deployment['metadata']['name']}-pod-0-{deployment['spec']['template']['spec']['containers'][0]['name']}"
    )
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
            assert (
                'onnxserve_model_ready{model="mlp",provider="CPUExecutionProvider",version="1"} 1.0'
                in response.read().decode()
            )

        probe = podman(
            "exec",
            container_name,
            "sh",
            "-c",
            "id -u; touch /tmp/scratch && echo tmp-writable; touch /x",
            check_rc=False,
        )
        assert probe.stdout.split() == ["10001", "tmp-writable"]
        assert "Read-only file system" in probe.stderr
        # The usage log's directory is writable by the server's user; the TLS and API key
        # directories are there, empty and read-only, and the server ignores them (all off).
        volumes = podman(
            "exec",
            container_name,
            "sh",
            "-c",
            "touch /var/log/onnxserve/probe && echo usage-log-writable; "
            "ls -A /etc/onnxserve/tls /etc/onnxserve/api-keys; touch /etc/onnxserve/tls/x",
            check_rc=False,
        )
        assert volumes.stdout.split() == ["usage-log-writable", "/etc/onnxserve/api-keys:", "/etc/onnxserve/tls:"]
        assert "Read-only file system" in volumes.stderr
        capabilities = podman("exec", container_name, "grep", "CapEff", "/proc/self/status").stdout.split()[-1]
        assert int(capabilities, 16) == 0, "every capability is dropped"
    finally:
        podman("kube", "down", str(manifest), check_rc=False)


# --- the tenants example --------------------------------------------------------------------

API_KEY, NEW_API_KEY = "tenants-test-key-1", "tenants-test-key-2"


def certificates_like(docs: list[dict], directory: Path) -> dict[str, Pair]:
    """What cert-manager would issue for the example's Certificates: a CA, the server certificate
    (its DNS names, server and client auth) and the tenant's client certificate (its CN)."""
    certificates = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "Certificate"}
    server, client = certificates["onnxserve-tls"], certificates["onnxserve-client-team-a"]
    assert {"server auth", "client auth"} <= set(server["usages"]) and "client auth" in client["usages"]
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "ca")
    names = ",".join(f"DNS:{name}" for name in server["dnsNames"])
    return {
        "ca": ca,
        "server": make_leaf(
            directory,
            "server",
            ca,
            server["commonName"],
            f"subjectAltName = {names}\nextendedKeyUsage = serverAuth,clientAuth\n",
        ),
        "client": make_leaf(directory, "client", ca, client["commonName"], "extendedKeyUsage = clientAuth\n"),
    }


def write_secret_file(path: Path, content: str | bytes) -> None:
    """As the kubelet projects a Secret with defaultMode 0440 under fsGroup 10001, replacing the
    file at once (the kubelet swaps a symlink; a rename is as atomic)."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chown(staged, 0, 10001)
    staged.chmod(0o440)
    os.replace(staged, path)


def tenants_pod_for_podman(docs: list[dict], image: str, secrets: dict[str, Path]) -> tuple[dict, dict[str, int]]:
    """The example's Deployment as podman 4.3 can run it, each change what the kubelet would do:
    - Secret volumes become host directories holding the Secret's files (podman 4.3 writes a
      Secret's `data` still base64-encoded into the volume and ignores `stringData`);
    - $(POD_NAME) is expanded (podman passes it on literally);
    - the native sidecar (an init container with restartPolicy Always) becomes a regular
      container (podman 4.3 would wait for it to finish before starting the server).
    The PersistentVolumeClaim becomes a podman volume of the claim's name."""
    deployment, published = pod_spec_for_podman(next(doc for doc in docs if doc["kind"] == "Deployment"), image)
    spec = deployment["spec"]["template"]["spec"]
    pod_name = f"{deployment['metadata']['name']}-pod-0"
    for volume in spec["volumes"]:
        if "secret" in volume:
            volume["hostPath"] = {"path": str(secrets[volume.pop("secret")["secretName"]]), "type": "Directory"}
    sidecars = spec.pop("initContainers")
    for sidecar in sidecars:
        assert sidecar.pop("restartPolicy") == "Always"
        sidecar["image"], sidecar["imagePullPolicy"] = image, "Never"
        sidecar.pop("resources", None)
    spec["containers"] += sidecars
    for container in spec["containers"]:
        for item in container.get("env", []):
            if "value" in item:
                item["value"] = item["value"].replace("$(POD_NAME)", pod_name)
        if "command" in container:
            container["command"] = [part.replace("$(POD_NAME)", pod_name) for part in container["command"]]
    deployment["metadata"].pop("namespace", None)
    return deployment, published


def test_tenants_example_runs_as_a_real_pod(podman_image, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the Secret stand-ins are owned by group 10001, which needs root")
    docs = rendered("examples/tenants")
    pairs = certificates_like(docs, tmp_path / "pki")
    keys_secret = next(doc for doc in docs if doc["kind"] == "Secret")
    keys = json.loads(keys_secret["stringData"]["api-keys.json"])
    keys["keys"][0]["sha256"] = hashlib.sha256(API_KEY.encode()).hexdigest()  # the placeholder, replaced
    secrets = {"onnxserve-tls": tmp_path / "tls", keys_secret["metadata"]["name"]: tmp_path / "api-keys"}
    for directory in secrets.values():
        directory.mkdir()
    for name, pair in (
        ("tls.crt", pairs["server"].cert),
        ("tls.key", pairs["server"].key),
        ("ca.crt", pairs["ca"].cert),
    ):
        write_secret_file(secrets["onnxserve-tls"] / name, pair.read_bytes())
    write_secret_file(secrets[keys_secret["metadata"]["name"]] / "api-keys.json", json.dumps(keys))

    deployment, published = tenants_pod_for_podman(docs, podman_image, secrets)
    spec = deployment["spec"]["template"]["spec"]
    [claim] = [
        volume["persistentVolumeClaim"]["claimName"] for volume in spec["volumes"] if "persistentVolumeClaim" in volume
    ]
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    server_name, shipper_name = (f"{deployment['metadata']['name']}-pod-0-{c['name']}" for c in spec["containers"])
    podman("kube", "down", str(manifest), check_rc=False)
    podman("volume", "rm", "--force", claim, check_rc=False)
    podman("volume", "create", claim)
    podman("kube", "play", "--replace", str(manifest))
    try:
        server = spec["containers"][0]
        probes = {kind: server[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        # The readiness probe, as the kubelet sends it: HTTPS, certificate not checked.
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        ready = probes["readinessProbe"]["httpGet"]
        ready_url = f"https://127.0.0.1:{published['http']}{ready['path']}"

        def https_ready() -> bool:
            try:
                with urllib.request.urlopen(ready_url, context=unverified, timeout=2) as response:
                    return response.status == 200
            except (OSError, urllib.error.URLError):
                return False

        assert wait_until(https_ready, timeout=60), podman("logs", server_name, check_rc=False).stderr[-3000:]
        # The liveness probe's own command, in the container: gRPC health over mutual TLS.
        liveness = podman("exec", server_name, *probes["livenessProbe"]["exec"]["command"], check_rc=False)
        assert liveness.returncode == 0 and "SERVING" in liveness.stdout, liveness

        # A tenant's gRPC client with its client certificate (mapped to team-a by its CN).
        ca, client = pairs["ca"], pairs["client"]
        dns_name = next(doc for doc in docs if doc["metadata"]["name"] == "onnxserve-tls")["spec"]["dnsNames"][1]
        grpc_address = f"127.0.0.1:{published['grpc']}"
        tls = ProbeTls(ca.cert.read_bytes(), dns_name, client.key.read_bytes(), client.cert.read_bytes())
        assert check(grpc_address, "", timeout=5, tls=tls) == "SERVING"
        triton = grpcclient.InferenceServerClient(
            grpc_address,
            ssl=True,
            root_certificates=str(ca.cert),
            private_key=str(client.key),
            certificate_chain=str(client.cert),
            channel_args=[("grpc.ssl_target_name_override", dns_name)],
        )
        rows = grpcclient.InferInput("x", [2, 4], "FP32")
        rows.set_data_from_numpy(np.ones((2, 4), np.float32))
        answer = triton.infer("mlp", [rows])
        assert answer.as_numpy("probabilities").shape == (2, 3)
        assert answer.get_response().parameters["onnxserve_tenant"].string_param == "team-a"
        triton.close()
        # Without a client certificate the gRPC port refuses the handshake.
        plain_tls = ProbeTls(ca.cert.read_bytes(), dns_name)
        with pytest.raises(grpc.RpcError):
            check(grpc_address, "", timeout=5, tls=plain_tls)

        # REST over TLS with API keys; the client checks the server against the CA.
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode()

        def rest(key: str | None) -> int:
            """An inference over HTTPS to loopback, checking the certificate for the Service's name."""
            context = ssl.create_default_context(cafile=str(ca.cert))
            connection = http.client.HTTPSConnection(dns_name, published["http"], context=context, timeout=5)
            raw = socket.create_connection(("127.0.0.1", published["http"]), timeout=5)
            connection.sock = context.wrap_socket(raw, server_hostname=dns_name)
            headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
            try:
                connection.request("POST", "/v2/models/mlp/infer", body, headers)
                response = connection.getresponse()
                response.read()
                return response.status
            finally:
                connection.close()

        assert rest(API_KEY) == 200
        assert rest(None) == 401 and rest("not-a-key") == 401
        # Rotation: the key file replaced in place, as a Secret update does; no restart.
        keys["keys"][0]["sha256"] = hashlib.sha256(NEW_API_KEY.encode()).hexdigest()
        write_secret_file(secrets[keys_secret["metadata"]["name"]] / "api-keys.json", json.dumps(keys))
        assert wait_until(lambda: rest(NEW_API_KEY) == 200, timeout=10), "the rotated key was not picked up"
        assert rest(API_KEY) == 401

        # /metrics stays plain HTTP, with the tenant's cost and budget.
        with urllib.request.urlopen(f"http://127.0.0.1:{published['metrics']}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert re.search(r'onnxserve_tenant_cost_dollars_total\{[^}]*tenant="team-a"', metrics)
        assert 'onnxserve_tenant_budget_dollars_per_hour{tenant="team-a"} 2.5' in metrics

        # The usage log: this pod's own file on the claim, read by the reader and by the sidecar.
        usage_path = next(item["value"] for item in server["env"] if item["name"] == "ONNXSERVE_USAGE_LOG")
        assert usage_path == "/var/log/onnxserve/usage-onnxserve-pod-0.jsonl"

        def shipped() -> list[dict]:
            lines = podman("logs", shipper_name, check_rc=False).stdout.splitlines()
            return [json.loads(line) for line in lines if line.startswith("{")]

        # One record per answered request: gRPC with the certificate, REST with the old key and
        # with the new one; refused calls have none.
        assert wait_until(lambda: len(shipped()) == 3, timeout=10), shipped()
        records = shipped()
        assert [(r["tenant"], r["tenant_source"], r["protocol"]) for r in records] == [
            ("team-a", "certificate", "grpc"),
            ("team-a", "api_key", "http"),
            ("team-a", "api_key", "http"),
        ]
        report = podman("exec", server_name, "onnxserve", "usage", "--format", "json", usage_path)
        assert '"team-a"' in report.stdout, report.stdout
    finally:
        podman("kube", "down", str(manifest), check_rc=False)
        podman("volume", "rm", "--force", claim, check_rc=False)
