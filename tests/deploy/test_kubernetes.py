"""The Kubernetes manifests in deploy/kubernetes: each overlay renders with `kubectl kustomize` and
passes the Kubernetes 1.30 OpenAPI schemas (strict: no unknown fields); every YAML file under
deploy/ passes yamllint; the parsed manifests agree with each other and with the server (probe
ports, selectors, port names, security context, grace period, GPU limits, HPA target and metric;
in the tenants example TLS files, API keys, the usage log volume and its shipper, probes that work
under TLS, and the cert-manager chain); and the autoscaling signal, computed by
prometheus-adapter's own query from the shipped rule, is what a real server under a known load
reports, scraped by a real Prometheus.

What this cannot check: admission by a real API server, scheduling, real HPA decisions and the
KServe controller (see deploy/kubernetes/README.md)."""

import asyncio
import json
import re
import shutil
import subprocess
import time
from dataclasses import fields
from pathlib import Path

import kubernetes_validate
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from server.config import ENV_PREFIX, ServerSettings, parse_server_settings
from server.observe.trace_config import trace_config
from tests import onnx_models
from tests.conftest import start_server, wait_until
from tests.integration.test_batching import caller_rows, inputs
from tests.prometheus import prometheus_binary, start_prometheus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
ADAPTER_RULES = KUBERNETES / "autoscaling" / "prometheus-adapter-rules.yaml"
KSERVE = KUBERNETES / "kserve"
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
TENANTS = "examples/tenants"
# Probed with the kubelet's gRPC probes (plaintext gRPC); the tenants example serves TLS.
TRACING = "examples/tracing"
GRPC_PROBED = (*OVERLAYS, "examples/models-from-pvc", "examples/models-polled", TRACING)
RENDERED = (*GRPC_PROBED, TENANTS)
BASE_KINDS = ["Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "HorizontalPodAutoscaler"]
# What an example adds to the base's kinds, and its custom resources (no bundled schema).
EXTRA_KINDS = {
    TENANTS: ["Issuer", "Issuer", "Certificate", "Certificate", "Certificate", "Secret", "PersistentVolumeClaim"],
    TRACING: ["ConfigMap"],
}
EXTRA_CUSTOM_KINDS = {TENANTS: {"Issuer", "Certificate"}}
# Custom resources: no schema is bundled, kubernetes-validate can only warn about them.
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService", "Issuer", "Certificate"}
# Files the base mounts, under cert-manager's names, and what turns each on (nothing, in the base).
TLS_DIR, API_KEYS_DIR, USAGE_LOG_DIR = "/etc/onnxserve/tls", "/etc/onnxserve/api-keys", "/var/log/onnxserve"
TLS_SECRET, API_KEYS_SECRET = "onnxserve-tls", "onnxserve-api-keys"
OFF_IN_THE_BASE = {
    f"ONNXSERVE_{transport}_{flag}"
    for transport in ("GRPC", "HTTP", "METRICS")
    for flag in ("USE_SSL", "USE_SSL_MUTUAL", "SERVER_CERT", "SERVER_KEY", "ROOT_CERT")
} | {"ONNXSERVE_API_KEYS", "ONNXSERVE_USAGE_LOG", "ONNXSERVE_TRUST_TENANT_HEADER"}
YAMLLINT = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"


# --- rendering and schema validation ---------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (`kubectl kustomize` renders the overlays offline)")
    out = {}
    for name in RENDERED:
        result = subprocess.run(
            [kubectl, "kustomize", str(KUBERNETES / name)], check=False, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate(docs: list[dict]) -> set[str]:
    """Validate every document strictly; return the kinds that have no bundled schema."""
    unknown = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.add(doc["kind"])
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {error.message}")
    return unknown


@pytest.mark.parametrize("name", RENDERED)
def test_overlay_renders_and_passes_the_schemas(rendered, name):
    docs = rendered[name]
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(BASE_KINDS + EXTRA_KINDS.get(name, []))
    # Only the CRDs go unchecked; a mistyped apiVersion of a built-in kind would land here too.
    assert validate(docs) == {"ServiceMonitor"} | EXTRA_CUSTOM_KINDS.get(name, set())


def test_schema_validation_catches_an_unknown_field(rendered):
    """The strict schemas are really applied: a misspelt field fails."""
    broken = json.loads(json.dumps(one(rendered["overlays/cpu"], "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- yamllint ----------------------------------------------------------------------------------


def yaml_files() -> list[str]:
    return sorted(str(path.relative_to(ROOT)) for path in DEPLOY.rglob("*") if path.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", yaml_files())
def test_yamllint(path):
    problems = list(linter.run((ROOT / path).read_text(), YamlLintConfig(YAMLLINT), path))
    assert not problems, "\n".join(f"{path}:{p.line}:{p.column}: {p.message} ({p.rule})" for p in problems)


# --- what the schemas cannot see ---------------------------------------------------------------


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def server_container(docs: list[dict]) -> dict:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container: dict) -> dict[str, str]:
    """The plain values (valueFrom entries are left out: see field_refs)."""
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def field_refs(container: dict) -> dict[str, str]:
    """Variables from the downward API: name -> fieldPath."""
    return {
        item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"]
        for item in container.get("env", [])
        if "fieldRef" in item.get("valueFrom", {})
    }


def matches(selector: dict, labels: dict) -> bool:
    """A Service's selector (a plain map) or a LabelSelector with matchLabels only."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        assert set(selector) == {"matchLabels"}, "only matchLabels selectors are expected here"
        selector = selector["matchLabels"]
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def assert_probes_hit_container_ports(container: dict) -> None:
    numbers = {port["containerPort"] for port in container["ports"]}
    names = {port["name"] for port in container["ports"]}
    for kind, probe in probes(container).items():
        for action in ("grpc", "httpGet", "tcpSocket"):
            if action in probe:
                port = probe[action]["port"]
                assert port in numbers | names, f"{kind} probes port {port}; the container has {numbers} {names}"


def assert_health_services(container: dict) -> None:
    found = probes(container)
    assert {"readinessProbe", "livenessProbe"} <= set(found)
    for kind, probe in found.items():
        assert "grpc" in probe, f"{kind} should use Kubernetes' native gRPC probe"
    # "" is SERVING once every model is loaded and warmed; "liveness" as soon as the process listens.
    assert found["readinessProbe"]["grpc"].get("service", "") == ""
    assert found["livenessProbe"]["grpc"].get("service") == "liveness"
    if "startupProbe" in found:
        assert found["startupProbe"]["grpc"].get("service", "") == ""


def pem_pair(directory: Path) -> tuple[Path, Path]:
    """A real self-signed certificate and key (openssl), where the server's checks read them;
    placeholder files where openssl is missing (the settings check only that they are readable)."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    if not cert.exists():
        openssl = shutil.which("openssl")
        if openssl:
            subprocess.run(
                [
                    openssl,
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    str(key),
                    "-out",
                    str(cert),
                    "-days",
                    "1",
                    "-subj",
                    "/CN=onnxserve",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
        else:
            cert.write_text("placeholder certificate\n")
            key.write_text("placeholder key\n")
    return cert, key


def server_settings(env: dict[str, str], tmp_path: Path) -> ServerSettings:
    """What the server makes of the manifest's environment (its own parser and checks)."""
    flags = {ENV_PREFIX + spec.name.upper() for spec in fields(ServerSettings)}
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - flags
    assert not unknown, f"no such server setting: {unknown}"
    # Paths are checked for existence, which only the container can do: local stand-ins here
    # (where they point inside the container is checked against the mounts elsewhere).
    local = {"ONNXSERVE_MODEL_REPOSITORY": str(tmp_path)}
    if env.get("ONNXSERVE_TENSORRT_CACHE_DIR"):
        local["ONNXSERVE_TENSORRT_CACHE_DIR"] = str(tmp_path)
    cert, key = pem_pair(tmp_path)
    for name in env:
        if name.endswith(("_SERVER_CERT", "_ROOT_CERT")):
            local[name] = str(cert)
        elif name.endswith("_SERVER_KEY"):
            local[name] = str(key)
    if env.get("ONNXSERVE_API_KEYS"):
        keys = tmp_path / "api-keys.json"
        keys.write_text('{"keys": []}')
        local["ONNXSERVE_API_KEYS"] = str(keys)
    if env.get("ONNXSERVE_USAGE_LOG"):
        local["ONNXSERVE_USAGE_LOG"] = str(tmp_path / "usage.jsonl")
    return parse_server_settings([], {**env, **local})


@pytest.mark.parametrize("name", RENDERED)
def test_every_probe_has_exactly_one_handler(rendered, name):
    """A patch that switches a probe's handler must also remove the old one (`grpc: null`): the
    API server refuses a probe with two, which the schemas do not catch."""
    for kind, probe in probes(server_container(rendered[name])).items():
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(probe)
        assert len(handlers) == 1, f"{kind} has handlers {sorted(handlers)}"


@pytest.mark.parametrize("name", GRPC_PROBED)
def test_probes_use_the_grpc_port_and_the_right_health_services(rendered, name):
    container = server_container(rendered[name])
    assert_probes_hit_container_ports(container)
    assert_health_services(container)
    assert "startupProbe" in container, "model loading needs a startup probe"
    grpc_port = {port["name"]: port["containerPort"] for port in container["ports"]}["grpc"]
    for kind, probe in probes(container).items():
        assert probe["grpc"]["port"] == grpc_port, kind


@pytest.mark.parametrize("name", RENDERED)
def test_ports_match_what_the_server_listens_on(rendered, name, tmp_path):
    container = server_container(rendered[name])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(ports) == {"http", "grpc", "metrics"}
    env = env_of(container)
    # Pinned in the manifest, so ports, probes and grace period never rest on a default that may
    # change (and a patch with an empty `env:` that wipes the list is caught).
    assert {
        "ONNXSERVE_GRPC_PORT",
        "ONNXSERVE_METRICS_PORT",
        "ONNXSERVE_HTTP_PORT",
        "ONNXSERVE_EXIT_TIMEOUT_SECS",
    } <= set(env)
    settings = server_settings(env, tmp_path)
    pinned = (ports["http"], ports["grpc"], ports["metrics"])
    assert pinned == (settings.http_port, settings.grpc_port, settings.metrics_port) == (8000, 8001, 8002)


@pytest.mark.parametrize("name", RENDERED)
def test_service_and_servicemonitor_reach_the_pods(rendered, name):
    docs = rendered[name]
    deployment, service, monitor = one(docs, "Deployment"), one(docs, "Service"), one(docs, "ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"], pod_labels)
    assert service["spec"]["type"] == "ClusterIP"
    assert matches(service["spec"]["selector"], pod_labels)
    container_ports = {port["name"]: port["containerPort"] for port in server_container(docs)["ports"]}
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc", "metrics"}
    for port_name, port in service_ports.items():
        assert port["targetPort"] in (port_name, container_ports[port_name]), port
    assert service_ports["grpc"]["appProtocol"] == "grpc" and service_ports["http"]["appProtocol"] == "http"
    # The ServiceMonitor selects the Service (by its labels) and scrapes its port named metrics.
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["port"] in service_ports
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "15s")
    pdb = one(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["minAvailable"] == 1


@pytest.mark.parametrize("name", RENDERED)
def test_security_context(rendered, name):
    spec = pod_spec(rendered[name])
    pod, container = spec.get("securityContext", {}), server_container(rendered[name])["securityContext"]

    def effective(key):  # a container setting wins over the pod's
        return container.get(key, pod.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == 10001 and effective("runAsGroup") == 10001
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"] and not container["capabilities"].get("add")
    assert container.get("privileged", False) is False


@pytest.mark.parametrize("name", RENDERED)
def test_volumes(rendered, name):
    spec, container = pod_spec(rendered[name]), server_container(rendered[name])
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    for mount in mounts.values():
        assert mount["name"] in volumes, mount
    # The only writable place on a read-only root filesystem.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]] and not mounts["/tmp"].get("readOnly")
    assert mounts["/models"]["name"] == "models" and mounts["/models"]["readOnly"] is True
    for volume in volumes.values():
        assert len(set(volume) - {"name"}) == 1, f"volume {volume['name']} has more than one source"


@pytest.mark.parametrize("name", RENDERED)
def test_grace_period_outlasts_the_servers_drain(rendered, name, tmp_path):
    spec, container = pod_spec(rendered[name]), server_container(rendered[name])
    settings = server_settings(env_of(container), tmp_path)
    assert settings.exit_timeout_secs == 20
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # The kubelet counts the preStop hook against the grace period, then SIGKILLs.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + settings.exit_timeout_secs


@pytest.mark.parametrize("name", RENDERED)
def test_tls_keys_and_usage_log_volumes(rendered, name):
    """The base mounts TLS and API keys from Secrets under cert-manager's names, directory mounts
    (no subPath, so a changed Secret reaches the running server), and a writable usage log."""
    spec, container = pod_spec(rendered[name]), server_container(rendered[name])
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    for directory, secret in ((TLS_DIR, TLS_SECRET), (API_KEYS_DIR, API_KEYS_SECRET)):
        mount = mounts[directory]
        assert mount.get("readOnly") is True and "subPath" not in mount and "subPathExpr" not in mount
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == secret
        # Optional where nothing reads them (a missing Secret mounts as an empty directory),
        # required where the server is told to read them.
        assert source["optional"] is (name != TENANTS)
        assert source.get("defaultMode", 0o644) & 0o040, "the pod's group (fsGroup) must read the files"
    assert spec["securityContext"]["fsGroup"] == 10001
    usage = mounts[USAGE_LOG_DIR]
    assert not usage.get("readOnly") and "subPath" not in usage
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[usage["name"]])
    for secret_mount in (m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]):
        assert "subPath" not in secret_mount, secret_mount


@pytest.mark.parametrize("name", GRPC_PROBED)
def test_nothing_turns_on_by_itself(rendered, name, tmp_path):
    """TLS, API keys and the usage log are mounted but off until an overlay turns them on."""
    env = env_of(server_container(rendered[name]))
    assert not OFF_IN_THE_BASE & set(env)
    settings = server_settings(env, tmp_path)
    assert not (settings.grpc_use_ssl or settings.http_use_ssl or settings.metrics_use_ssl)
    assert not (settings.api_keys or settings.usage_log)


def test_traces_come_from_an_optional_configmap_that_only_the_tracing_example_makes(rendered):
    for name in RENDERED:
        (source,) = server_container(rendered[name])["envFrom"]
        assert source["configMapRef"]["optional"] is True and source["configMapRef"]["name"].startswith(
            "onnxserve-tracing"
        )
        maps = [doc for doc in rendered[name] if doc["kind"] == "ConfigMap"]
        assert [doc["metadata"]["name"] for doc in maps] == (
            [source["configMapRef"]["name"]] if name == TRACING else []
        )


def test_the_tracing_example_exports_to_a_collector_as_the_server_reads_it(rendered):
    (configmap,) = [doc for doc in rendered[TRACING] if doc["kind"] == "ConfigMap"]
    config = trace_config((), configmap["data"])
    assert config.endpoint.startswith("http://otel-collector.") and config.level != "OFF"
    assert (config.protocol, config.rate) == ("grpc", 0.01)


def test_model_repository_stays_at_the_image_default_in_the_overlays(rendered):
    for name in OVERLAYS:
        assert "ONNXSERVE_MODEL_REPOSITORY" not in env_of(server_container(rendered[name]))


def test_pvc_example_serves_the_mounted_repository(rendered, tmp_path):
    docs = rendered["examples/models-from-pvc"]
    container, spec = server_container(docs), pod_spec(docs)
    env = env_of(container)
    assert set(env) >= set(env_of(server_container(rendered["overlays/cpu"]))), "the patch dropped variables"
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert env["ONNXSERVE_MODEL_REPOSITORY"] == mounts["models"]["mountPath"]
    [models] = [volume for volume in spec["volumes"] if volume["name"] == "models"]
    assert set(models) == {"name", "persistentVolumeClaim"}
    server_settings(env, tmp_path)


def test_polled_example_follows_the_mounted_repository(rendered, tmp_path):
    polled, pvc = rendered["examples/models-polled"], rendered["examples/models-from-pvc"]
    env = env_of(server_container(polled))
    assert set(env) >= set(env_of(server_container(pvc))), "the patch dropped variables"
    assert pod_spec(polled)["volumes"] == pod_spec(pvc)["volumes"]
    settings = server_settings(env, tmp_path)
    assert settings.model_control_mode == "poll" and settings.repository_poll_secs == 30


def test_the_gpu_overlay_requires_the_gpu_and_caches_engines_on_its_volume(rendered, tmp_path):
    container = server_container(rendered["overlays/gpu"])
    env = env_of(container)
    assert server_settings(env, tmp_path).require_gpu is True
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert env["ONNXSERVE_TENSORRT_CACHE_DIR"] in mounts and not mounts[env["ONNXSERVE_TENSORRT_CACHE_DIR"]].get(
        "readOnly"
    )
    assert "ONNXSERVE_REQUIRE_GPU" not in env_of(server_container(rendered["overlays/cpu"]))


def test_gpu_limits_only_in_the_gpu_overlay(rendered):
    cpu, gpu = server_container(rendered["overlays/cpu"]), server_container(rendered["overlays/gpu"])
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in cpu["resources"].get(section, {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(cpu["resources"]["limits"]) and {"cpu", "memory"} <= set(
        cpu["resources"]["requests"]
    )
    tolerations = pod_spec(rendered["overlays/gpu"]).get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)
    assert not pod_spec(rendered["overlays/cpu"]).get("tolerations")
    # A writable TensorRT engine cache on GPU only.
    gpu_mounts = {mount["mountPath"]: mount for mount in gpu["volumeMounts"]}
    assert "/cache" in gpu_mounts and not gpu_mounts["/cache"].get("readOnly")
    assert "/cache" not in {mount["mountPath"] for mount in cpu["volumeMounts"]}

    def startup_budget(container):
        probe = container["startupProbe"]
        return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

    assert startup_budget(gpu) > startup_budget(cpu) >= 300


# --- the tenants example: TLS, API keys, usage log -----------------------------------------------


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def mounted_file(container: dict, spec: dict, path: str) -> tuple[dict, str]:
    """The volume a file path lies in, and the file's name within it (one level deep)."""
    directory, _, filename = path.rpartition("/")
    [mount] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == directory]
    [volume] = [volume for volume in spec["volumes"] if volume["name"] == mount["name"]]
    return volume, filename


def expand(value: str, container: dict) -> str:
    """Kubernetes' $(VAR) expansion, which sees only variables listed before the one expanded
    (and, in command, the container's variables); downward API values become <fieldPath>."""
    known = {}
    for item in container.get("env", []):
        known[item["name"]] = item.get("value") or f"<{item['valueFrom']['fieldRef']['fieldPath']}>"
    return re.sub(r"\$\((\w+)\)", lambda m: known[m.group(1)], value)


def test_tenants_serves_tls_from_the_cert_manager_secret(rendered, tmp_path):
    docs = rendered[TENANTS]
    container, spec = server_container(docs), pod_spec(docs)
    env = env_of(container)
    settings = server_settings(env, tmp_path)
    # gRPC over mutual TLS (tenants by client certificate), REST over TLS (tenants by API key),
    # metrics plain for the ServiceMonitor.
    assert settings.grpc_use_ssl and settings.grpc_use_ssl_mutual
    assert settings.http_use_ssl and not settings.http_use_ssl_mutual
    assert not settings.metrics_use_ssl
    assert "scheme" not in one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    # Every TLS file is a key that cert-manager writes into the Secret its Certificate names.
    certificate = named(docs, "Certificate")[TLS_SECRET]
    for variable, key in {
        "ONNXSERVE_GRPC_SERVER_CERT": "tls.crt",
        "ONNXSERVE_GRPC_SERVER_KEY": "tls.key",
        "ONNXSERVE_GRPC_ROOT_CERT": "ca.crt",
        "ONNXSERVE_HTTP_SERVER_CERT": "tls.crt",
        "ONNXSERVE_HTTP_SERVER_KEY": "tls.key",
    }.items():
        volume, filename = mounted_file(container, spec, env[variable])
        assert (volume["secret"]["secretName"], filename) == (certificate["spec"]["secretName"], key), variable


def test_tenants_certificates(rendered):
    docs = rendered[TENANTS]
    certificates, issuers = named(docs, "Certificate"), named(docs, "Issuer")
    service = one(docs, "Service")
    namespace = service["metadata"]["namespace"]
    assert {doc["metadata"].get("namespace") for doc in docs} == {namespace}
    server = certificates[TLS_SECRET]["spec"]
    name = service["metadata"]["name"]
    # What clients dial, in this namespace (filled in by the kustomization's replacement).
    # onnxserve-health asks for the first DNS name, whatever address it dials.
    assert server["dnsNames"][:3] == [name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    # Server auth for clients, client auth for the liveness probe under mutual TLS (it presents
    # the server's certificate, which the CA in ca.crt, the server's root for clients, signed).
    assert {"server auth", "client auth"} <= set(server["usages"])
    assert server["secretName"] == TLS_SECRET
    # Both leaf certificates come from the CA issuer, whose secret is the self-signed CA's.
    client = certificates["onnxserve-client-team-a"]["spec"]
    for leaf in (server, client):
        assert leaf["issuerRef"]["kind"] == "Issuer" and leaf["issuerRef"]["name"] in issuers
        ca_issuer = issuers[leaf["issuerRef"]["name"]]["spec"]["ca"]
        [ca] = [cert["spec"] for cert in certificates.values() if cert["spec"]["secretName"] == ca_issuer["secretName"]]
        assert ca["isCA"] is True and "selfSigned" in issuers[ca["issuerRef"]["name"]]["spec"]
        hours = {key: int(leaf[key].removesuffix("h")) for key in ("renewBefore", "duration")}
        assert 0 < hours["renewBefore"] < hours["duration"], hours
    assert set(client["usages"]) >= {"client auth"} and "server auth" not in client["usages"]
    # A renewed server certificate rolls the pods (Reloader); the API keys never need to.
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["annotations"]["secret.reloader.stakater.com/reload"] == TLS_SECRET


def test_tenants_namespace_and_image_are_set_in_one_place(tmp_path):
    """Changing the example's namespace changes the certificate's DNS names, and retagging the
    image retags the sidecar too (kustomize replacements), in a copy of the tree."""
    kubectl = shutil.which("kubectl") or pytest.skip("kubectl is not installed")
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    kustomization = copy / TENANTS / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("\nnamespace: ml\n") == 1
    kustomization.write_text(text.replace("\nnamespace: ml\n", "\nnamespace: prod\n"))
    base = copy / "base" / "kustomization.yaml"
    base.write_text(base.read_text().replace("newTag: 0.1.0", 'newTag: "9.9"'))
    result = subprocess.run([kubectl, "kustomize", str(copy / TENANTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    dns_names = named(docs, "Certificate")[TLS_SECRET]["spec"]["dnsNames"]
    assert {"onnxserve.prod.svc", "onnxserve.prod.svc.cluster.local"} <= set(dns_names)
    assert not [name for name in dns_names if ".ml." in name]
    spec = pod_spec(docs)
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {"onnxserve:9.9"}


def test_tenants_api_keys_secret(rendered, tmp_path):
    docs = rendered[TENANTS]
    container, spec = server_container(docs), pod_spec(docs)
    volume, filename = mounted_file(container, spec, env_of(container)["ONNXSERVE_API_KEYS"])
    secret = named(docs, "Secret")[volume["secret"]["secretName"]]
    assert secret["metadata"]["name"] == API_KEYS_SECRET
    keys = json.loads(secret["stringData"][filename])
    # The server's own reader accepts it (format, hashes, tenant names, budgets).
    from server.frontend.identity import read_key_file

    (tmp_path / filename).write_text(secret["stringData"][filename])
    parsed = read_key_file(str(tmp_path / filename))
    assert parsed.tenants == {"team-a"} and parsed.budgets == {"team-a": 2.5}
    assert set(keys) <= {"keys", "certificates", "tenants"} and keys["keys"]
    for key in keys["keys"]:
        assert re.fullmatch(r"[0-9a-f]{64}", key["sha256"]) and key["tenant"]
        # The shipped hash is a placeholder that no key matches.
        assert set(key["sha256"]) == {"0"}
    tenants = {key["tenant"] for key in keys["keys"]} | set(keys["certificates"].values())
    assert set(keys["tenants"]) <= tenants
    for tenant in keys["tenants"].values():
        assert float(tenant["budget_dollars_per_hour"]) > 0
    # The client certificate's CN is the one mapped to its tenant.
    client = named(docs, "Certificate")["onnxserve-client-team-a"]["spec"]
    assert keys["certificates"][client["commonName"]] == "team-a"


def test_tenants_probes_work_under_tls(rendered, tmp_path):
    """The kubelet's gRPC probes cannot speak TLS: readiness and start-up use HTTPS on the REST
    port (TLS there is not mutual), liveness runs onnxserve-health in the container."""
    container = server_container(rendered[TENANTS])
    assert_probes_hit_container_ports(container)
    found = probes(container)
    http_port = {port["name"]: port["containerPort"] for port in container["ports"]}["http"]
    for kind in ("startupProbe", "readinessProbe"):
        action = found[kind]["httpGet"]
        assert (action["scheme"], action["port"], action["path"]) == ("HTTPS", http_port, "/v2/health/ready")
    command = found["livenessProbe"]["exec"]["command"]
    assert command[0] == "onnxserve-health"
    assert command[command.index("--service") + 1] == "liveness"
    # The probe's own timeout ends before the kubelet's.
    assert float(command[command.index("--timeout") + 1]) < found["livenessProbe"]["timeoutSeconds"]
    # onnxserve-health reads the port and the TLS files from the same variables as the server.
    settings = server_settings(env_of(container), tmp_path)
    assert settings.grpc_port == 8001 and settings.grpc_use_ssl_mutual
    assert (
        "startupProbe" in found
        and found["startupProbe"]["periodSeconds"] * found["startupProbe"]["failureThreshold"] >= 300
    )


def test_tenants_usage_log_on_a_volume_per_pod_file(rendered):
    docs = rendered[TENANTS]
    container, spec = server_container(docs), pod_spec(docs)
    path = expand(env_of(container)["ONNXSERVE_USAGE_LOG"], container)
    # One file per pod, named after it: replicas share the volume, never a file.
    assert path == f"{USAGE_LOG_DIR}/usage-<metadata.name>.jsonl"
    names = [item["name"] for item in container["env"]]
    assert names.index("POD_NAME") < names.index("ONNXSERVE_USAGE_LOG"), "$(POD_NAME) must be defined first"
    volume, _ = mounted_file(container, spec, path)
    assert set(volume) == {"name", "persistentVolumeClaim"}, "billing data must outlive the pod"
    claim = named(docs, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica, on any node, writes to it"
    assert not volume["persistentVolumeClaim"].get("readOnly")


def test_tenants_usage_log_shipper_sidecar(rendered):
    docs = rendered[TENANTS]
    server, spec = server_container(docs), pod_spec(docs)
    [shipper] = spec["initContainers"]
    # A native sidecar: starts before the server and stops after it (so it sees the final flush).
    assert shipper["restartPolicy"] == "Always"
    assert shipper["image"] == server["image"]
    written = expand(env_of(server)["ONNXSERVE_USAGE_LOG"], server)
    command = [expand(part, shipper) for part in shipper["command"]]
    assert command[:1] == ["tail"] and "-F" in command and command[-1] == written
    mounts = {mount["mountPath"]: mount for mount in shipper["volumeMounts"]}
    server_mounts = {mount["mountPath"]: mount for mount in server["volumeMounts"]}
    assert mounts[USAGE_LOG_DIR]["name"] == server_mounts[USAGE_LOG_DIR]["name"]
    assert mounts[USAGE_LOG_DIR]["readOnly"] is True
    context = shipper["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["runAsNonRoot"] is True and context["capabilities"]["drop"] == ["ALL"]
    assert shipper["resources"]["limits"]["memory"]


def adapter_rule() -> dict:
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    return rule


def test_adapter_rule_shape():
    rule = adapter_rule()
    assert rule["seriesQuery"] == 'onnxserve_inflight_requests{namespace!="",pod!=""}'
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert re.search(rule["name"]["matches"], "onnxserve_inflight_requests")
    assert rule["name"]["as"] == "onnxserve_inflight_requests_per_pod"
    query = rule["metricsQuery"]
    assert "<<.GroupBy>>" in query and "<<.LabelMatchers>>" in query
    assert "rate(" not in query and "count(" not in query and "/" not in query


@pytest.mark.parametrize("name", OVERLAYS)
def test_hpa_scales_the_deployment_on_the_adapter_metric(rendered, name):
    docs = rendered[name]
    hpa, deployment = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] <= deployment["spec"]["replicas"] <= spec["maxReplicas"]
    # A drain must be able to evict a pod at the smallest size.
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] < spec["minReplicas"]
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_images_are_retaggable(rendered):
    for name in RENDERED:
        spec = pod_spec(rendered[name])
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["image"] == "onnxserve:0.1.0", container["name"]


# --- KServe ------------------------------------------------------------------------------------


def kserve_docs() -> dict[str, dict]:
    """The runtime, and the InferenceServices by protocol version."""
    docs = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "InferenceService":
                docs[doc["spec"]["predictor"]["model"]["protocolVersion"]] = doc
            elif doc:
                docs[doc["kind"]] = doc
    return docs


def test_kserve_manifests_parse_and_validate():
    docs = kserve_docs()
    assert set(docs) == {"ServingRuntime", "grpc-v2", "v2"}
    assert validate(list(docs.values())) == {"ServingRuntime", "InferenceService"}
    runtime = docs["ServingRuntime"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    # The runtime's containers and volumes are core/v1 types: check them against the Pod schema.
    spec = runtime["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "servingruntime-check"},
        "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
    }
    assert validate([pod]) == set()


def test_kserve_runtime_serves_the_storage_initializer_directory_over_grpc(tmp_path):
    docs = kserve_docs()
    runtime, service = docs["ServingRuntime"], docs["grpc-v2"]
    spec = runtime["spec"]
    assert runtime["metadata"]["name"] == "onnxserve"
    assert {"name": "onnx", "version": "1", "autoSelect": True}.items() <= spec["supportedModelFormats"][0].items()
    assert "grpc-v2" in spec["protocolVersions"]
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == "onnxserve:0.1.0"
    settings = server_settings(env_of(container), tmp_path)
    assert env_of(container)["ONNXSERVE_MODEL_REPOSITORY"] == "/mnt/models"
    # One port, named h2c, so Knative proxies HTTP/2 (gRPC) to it; it is the server's gRPC port.
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("h2c", settings.grpc_port)
    assert_probes_hit_container_ports(container)
    assert_health_services(container)
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert mounts["/tmp"] in {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}

    model = service["spec"]["predictor"]["model"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert re.match(r"^[a-z0-9]+://", model["storageUri"])


def test_kserve_rest_inferenceservice_reaches_the_http_port(tmp_path):
    docs = kserve_docs()
    runtime, rest, grpc_service = docs["ServingRuntime"], docs["v2"], docs["grpc-v2"]
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    settings = server_settings(env_of(runtime["spec"]["containers"][0]), tmp_path)
    model = rest["spec"]["predictor"]["model"]
    # Knative speaks HTTP/1.1 to a port named http1: the one the server serves REST on.
    [port] = model["ports"]
    assert (port["name"], port["containerPort"]) == ("http1", settings.http_port) == ("http1", 8000)
    same = ("runtime", "modelFormat", "storageUri")
    assert {key: model[key] for key in same} == {key: grpc_service["spec"]["predictor"]["model"][key] for key in same}


# --- the autoscaling signal, live --------------------------------------------------------------

QUEUED = 2  # behind one long-running request: 3 in flight
HOLD_SECONDS = 4.0
POD = {"namespace": "ml", "pod": "onnxserve-0"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    binary = prometheus_binary()
    repository = tmp_path_factory.mktemp("repository")
    config = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 0 }"
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), config)
    server = start_server(repository)
    prometheus = None
    try:
        prometheus = start_prometheus(
            binary, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.metrics_port}", labels=POD
        )
        yield server, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert server.stop() == 0


def hold_in_flight(url: str, queued: int, work: int, on_hold) -> list:
    """One request that keeps the slow model busy for `work` rounds, then `queued` more behind it;
    calls on_hold() (in a thread) while all of them are in flight, returns their results."""

    async def body():
        client = aioclient.InferenceServerClient(url)
        try:
            blocker = asyncio.create_task(client.infer("slow", inputs(caller_rows(0, 1), work=work)))
            await asyncio.sleep(0.3)  # the blocker runs: the rest wait in the queue
            waiting = [
                asyncio.create_task(client.infer("slow", inputs(caller_rows(i, 1), work=0)))
                for i in range(1, queued + 1)
            ]
            await asyncio.sleep(0.3)
            holding = asyncio.create_task(asyncio.to_thread(on_hold, blocker))
            results = await asyncio.gather(blocker, *waiting)
            await holding
            return results
        finally:
            await client.close()

    return asyncio.run(body())


def test_autoscaling_signal_against_live_prometheus(live):
    server, prometheus = live
    raw = 'onnxserve_inflight_requests{namespace="ml",pod="onnxserve-0"}'
    # Prometheus has scraped the idle server (the series exists at 0 once the model is ready).
    assert wait_until(lambda: prometheus.value(raw) == 0, timeout=15), "no scrape of the idle server"

    # Size the long request from this machine's speed, so it holds for about HOLD_SECONDS: the
    # time per round of work is the slope between two sizes, free of each call's fixed cost (which
    # on a fast machine is much of a short call). Each size is timed thrice, the fastest kept.
    client = server.client()

    def fastest(work: int) -> float:
        timings = []
        for _ in range(3):
            started = time.monotonic()
            client.infer("slow", inputs(caller_rows(0, 1), module=grpcclient, work=work))
            timings.append(time.monotonic() - started)
        return min(timings)

    short, long = fastest(1000), fastest(5000)
    work = max(1000, int(HOLD_SECONDS * 4000 / max(long - short, 1e-3)))

    held_from = []  # when the server itself reported all of them in flight
    seen = []  # (wall time, value) of the raw series in Prometheus from then on

    def watch(blocker) -> None:
        def all_in_flight():
            return server.samples().get("onnxserve_inflight_requests", model="slow", version="1") == 1 + QUEUED

        if wait_until(all_in_flight, timeout=HOLD_SECONDS / 2):
            held_from.append(time.time())
        while not blocker.done():
            seen.append((time.time(), prometheus.value(raw)))
            time.sleep(0.2)

    results = hold_in_flight(server.url, QUEUED, work, watch)
    t_released = time.time()
    assert held_from, f"the server never had {1 + QUEUED} requests in flight at once"
    for caller, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("y"), caller_rows(caller, 1) + 1)

    # The raw gauge, as scraped while the requests were held, is exactly the number in flight.
    at = t_released - 0.3
    window = prometheus.query(f"{raw}[1m]", at=at)
    assert len(window) == 1, window
    samples = [(float(ts), float(value)) for ts, value in window[0]["values"]]
    during = [value for ts, value in samples if held_from[0] <= ts <= at - 0.3]
    assert len(during) >= 2, f"too few scrapes during the hold ({HOLD_SECONDS} s): {samples}"
    assert set(during) == {1 + QUEUED}, samples
    assert any(value == 1 + QUEUED for _, value in seen)

    # prometheus-adapter's own query from the shipped rule, as the adapter fills it in for this
    # pod: the mean of the raw samples in its one-minute window, evaluated at the same instant.
    rule = adapter_rule()
    matchers = ",".join(f'{key}="{value}"' for key, value in POD.items())
    query = rule["metricsQuery"].replace("<<.GroupBy>>", "namespace, pod").replace("<<.LabelMatchers>>", matchers)
    result = prometheus.query(query, at=at)
    assert [series["metric"] for series in result] == [POD]
    mean = sum(value for _, value in samples) / len(samples)
    assert float(result[0]["value"][1]) == pytest.approx(mean, abs=1e-9)
    assert 0 < mean < 1 + QUEUED, "the window should hold idle and busy samples"
    # The adapter discovers the series with seriesQuery; it must carry the resource labels.
    discovered = prometheus.query(rule["seriesQuery"])
    assert [{key: s["metric"][key] for key in POD} for s in discovered] == [POD]

    # After the load the gauge goes back to 0, on the server and in Prometheus.
    assert wait_until(lambda: server.samples().get("onnxserve_inflight_requests", model="slow", version="1") == 0)
    assert wait_until(lambda: prometheus.value(raw) == 0, timeout=5), "the in-flight gauge did not return to 0"
