"""The Kubernetes manifests in deploy/kubernetes: each overlay renders with `kubectl kustomize` and
passes the Kubernetes 1.30 OpenAPI schemas (strict: no unknown fields); every YAML file under
deploy/ passes yamllint; the parsed manifests agree with each other and with the server (probe
ports, selectors, port names, security context, grace period, GPU limits, HPA target and metric);
and the autoscaling signal, computed by prometheus-adapter's own query from the shipped rule,
is what a real server under a known load reports, scraped by a real Prometheus.

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
RENDERED = (*OVERLAYS, "examples/models-from-pvc", "examples/models-polled")
# Custom resources: no schema is bundled, kubernetes-validate can only warn about them.
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}
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
    assert kinds == sorted(
        ["Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "HorizontalPodAutoscaler"]
    )
    # Only the CRD goes unchecked; a mistyped apiVersion of a built-in kind would land here too.
    assert validate(docs) == {"ServiceMonitor"}


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
    return {item["name"]: item["value"] for item in container.get("env", [])}


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


def server_settings(env: dict[str, str], tmp_path: Path) -> ServerSettings:
    """What the server makes of the manifest's environment (its own parser and checks)."""
    flags = {ENV_PREFIX + spec.name.upper() for spec in fields(ServerSettings)}
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - flags
    assert not unknown, f"no such server setting: {unknown}"
    # Paths are checked for existence, which only the container can do.
    local = {"ONNXSERVE_MODEL_REPOSITORY": str(tmp_path)}
    if env.get("ONNXSERVE_TENSORRT_CACHE_DIR"):
        local["ONNXSERVE_TENSORRT_CACHE_DIR"] = str(tmp_path)
    return parse_server_settings([], {**env, **local})


@pytest.mark.parametrize("name", RENDERED)
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
    assert {"ONNXSERVE_GRPC_PORT", "ONNXSERVE_METRICS_PORT", "ONNXSERVE_HTTP_PORT", "ONNXSERVE_EXIT_TIMEOUT_SECS"} <= set(env)
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
    assert env["ONNXSERVE_TENSORRT_CACHE_DIR"] in mounts and not mounts[env["ONNXSERVE_TENSORRT_CACHE_DIR"]].get("readOnly")
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
        assert server_container(rendered[name])["image"] == "onnxserve:0.1.0"


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
