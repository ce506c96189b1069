"""A real Prometheus scrapes a real server every second with our recording rules;
what it computes must match what the test itself sent and measured, and every
dashboard query must run."""

import json
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.observe.metrics import LATENCY_BUCKETS
from tests import onnx_models
from tests.conftest import ROOT, start_server, wait_until
from tests.integration.test_batching import caller_rows, inputs
from tests.integration.test_metrics import infer_many, parameter
from tests.prometheus import prometheus_binary, start_prometheus

RULES = [ROOT / "deploy" / "prometheus" / name for name in ("recording_rules.yml", "alert_rules.yml")]
DASHBOARD = ROOT / "deploy" / "grafana" / "onnxserve-dashboard.json"
LATENCY_BOUNDS = (0.0, *LATENCY_BUCKETS, float("inf"))  # the server's own buckets
# Series that only exist on a GPU machine; their panels may be empty here.
GPU_ONLY = (
    "onnxserve_gpu_",
    "onnxserve_energy_joules",
    "onnxserve_idle_energy_joules",
    "onnxserve_tenant_energy_joules",
)
# Budgets come from an --api-keys file, which would make every call here need a key: the tenants
# example's pod test (tests/deploy/test_pods.py) scrapes them.
KEYS_ONLY = ("onnxserve_tenant_budget_",)
LIMITS_ONLY = ("onnxserve_budget_used:ratio", "onnxserve_tenant_refused_total")  # with --tenant-limits only


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = prometheus_binary()
    repository = tmp_path_factory.mktemp("repository")
    batching = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 1000 }"
    onnx_models.write(repository, "fast", onnx_models.add_one(), batching)
    usage_log = tmp_path_factory.mktemp("usage") / "usage.log"
    server = start_server(repository, "--device-price", "cpu=36", "--usage-log", str(usage_log))
    workdir = tmp_path_factory.mktemp("prometheus")
    prometheus = start_prometheus(binary, workdir, f"127.0.0.1:{server.metrics_port}", rule_files=RULES)
    yield server, prometheus
    prometheus.stop()
    assert server.stop() == 0


def scraped(prometheus, server, metric: str, **labels) -> bool:
    """Prometheus holds the server's current value of a counter, and the rules have run on it."""
    current = server.samples().get(metric, **labels)
    return prometheus.value(metric) == current and prometheus.value("model:onnxserve_inferences:rate5m") is not None


def quantile_bounds(values: list[float], q: float) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))], ordered[-1]


def bucket_around(seconds: float) -> tuple[float, float]:
    for lower, upper in zip(LATENCY_BOUNDS, LATENCY_BOUNDS[1:]):
        if lower < seconds <= upper:
            return lower, upper
    return 0.0, float("inf")


def test_prometheus_computes_what_the_test_measured(stack):
    server, prometheus = stack
    fast = {"model": "fast", "version": "1"}
    # The series exist at 0 from the start; once scraped, rates cover exactly the load below.
    assert wait_until(lambda: scraped(prometheus, server, "onnxserve_inferences_total", **fast), timeout=30)
    mix = [1 + caller % 4 for caller in range(150)]

    answered = []
    for _ in range(3):
        answered += infer_many(server.url, "fast", mix, concurrency=12)
        time.sleep(0.5)
    assert wait_until(lambda: scraped(prometheus, server, "onnxserve_inferences_total", **fast), timeout=30)
    time.sleep(1.5)  # one more rule evaluation on the final scrape

    rows = sum(sent for sent, _, _ in answered)
    cost = sum(parameter(result, "onnxserve_cost_dollars") for _, result, _ in answered)
    batches = sum(sent / parameter(result, "onnxserve_batch_rows") for sent, result, _ in answered)

    cost_per_inference = prometheus.value("model:onnxserve_cost_per_inference_dollars:rate5m", model="fast")
    assert cost_per_inference == pytest.approx(cost / rows, rel=0.02)
    average_batch = prometheus.value("model:onnxserve_batch_size:avg_5m", model="fast")
    assert average_batch == pytest.approx(rows / batches, rel=0.02)
    assert average_batch > 1, "concurrent callers should have been batched"

    # p99 from buckets lies in the bucket of the true server-side p99, which is above the
    # queue + compute time the server reported and below what the client measured.
    inner = [(parameter(r, "onnxserve_queue_us") + parameter(r, "onnxserve_compute_us")) / 1e6 for _, r, _ in answered]
    client = [elapsed for _, _, elapsed in answered]
    p99 = prometheus.value("model:onnxserve_request_duration_seconds:p99_5m", model="fast")
    low, _ = bucket_around(quantile_bounds(inner, 0.99)[0])
    _, high = bucket_around(quantile_bounds(client, 0.99)[1])
    assert low <= p99 <= high, (low, p99, high)

    # What a user types: the design's PromQL for cost per inference, over the raw counters.
    raw = prometheus.value(
        "sum by (model) (onnxserve_cost_dollars_total) / sum by (model) (onnxserve_inferences_total)", model="fast"
    )
    counted = server.samples()
    assert raw == pytest.approx(
        counted.total("onnxserve_cost_dollars_total", **fast) / counted.get("onnxserve_inferences_total", **fast),
        rel=1e-6,
    )


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    nested = [inner for panel in panels for inner in panel.get("panels", [])]
    found = []
    for panel in panels + nested:
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel["title"], target["expr"]))
    return found


def test_every_dashboard_query_runs_against_live_prometheus(stack):
    server, prometheus = stack
    x = caller_rows(1, 2)
    client = server.client()
    for _ in range(20):
        client.infer("fast", inputs(x, module=grpcclient))
    assert wait_until(lambda: scraped(prometheus, server, "onnxserve_inferences_total", model="fast", version="1"))
    queries = dashboard_queries()
    assert len(queries) >= 10
    empty = []
    for title, expression in queries:
        promql = expression.replace("$__rate_interval", "1m").replace("$model", ".*")
        result = prometheus.query(promql)  # raises on a PromQL error
        if not result and not any(fragment in promql for fragment in GPU_ONLY + KEYS_ONLY + LIMITS_ONLY):
            empty.append((title, promql))
    assert not empty, f"panels with no data although load was sent: {empty}"
    np.testing.assert_array_equal(client.infer("fast", inputs(x, module=grpcclient)).as_numpy("y"), x + 1)


def test_every_recording_rule_evaluates_cleanly(stack):
    server, prometheus = stack
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules, "the recording rules were not loaded"
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not unhealthy
