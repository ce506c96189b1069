"""The Prometheus configuration, rules and rule unit tests in deploy/prometheus pass promtool,
every rule has unit tests (which fail when a result is wrong), the rules read only known metrics
(onnxserve's, and OpenCost's with the labels OpenCost gives them), and the Grafana dashboard
queries only known metrics and variables."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "onnxserve-dashboard.json"
RECORDING_RULES = PROMETHEUS / "recording_rules.yml"
ALERT_RULES = PROMETHEUS / "alert_rules.yml"
RECORDING_TESTS = PROMETHEUS / "recording_rules_test.yml"
ALERT_TESTS = PROMETHEUS / "alert_rules_test.yml"

# The metrics contract: what the server exposes (README, "Metrics").
HISTOGRAMS = {
    "onnxserve_request_duration_seconds",
    "onnxserve_queue_duration_seconds",
    "onnxserve_compute_duration_seconds",
    "onnxserve_batch_size",
}
MODEL_METRICS = {
    "onnxserve_requests_total",
    "onnxserve_inferences_total",
    "onnxserve_batches_total",
    "onnxserve_queue_depth",
    "onnxserve_queue_capacity",
    "onnxserve_model_ready",
    "onnxserve_cost_dollars_total",
    "onnxserve_energy_joules_total",
    # Per tenant (and model, version): tenant "unknown" = no identity, "other" = folded.
    "onnxserve_tenant_requests_total",
    "onnxserve_tenant_inferences_total",
    "onnxserve_tenant_cost_dollars_total",
    "onnxserve_tenant_energy_joules_total",
} | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
DEVICE_METRICS = {
    "onnxserve_idle_cost_dollars_total",
    "onnxserve_device_seconds_total",
    "onnxserve_device_price_dollars_per_hour",
    "onnxserve_idle_energy_joules_total",
    "onnxserve_gpu_utilization_ratio",
    "onnxserve_gpu_memory_used_bytes",
    "onnxserve_gpu_memory_total_bytes",
    "onnxserve_gpu_power_watts",
    "onnxserve_gpu_energy_joules_total",
}
# No model label: per tenant, or per server.
SERVER_METRICS = {
    "onnxserve_tenant_budget_dollars_per_hour",
    "onnxserve_tenant_spend_dollars",
    "onnxserve_tenant_budget_dollars",
    "onnxserve_tenant_refused_total",
    "onnxserve_tenant_in_flight_requests",
    "onnxserve_tenant_series_folded_total",
    "onnxserve_unauthenticated_requests_total",
    "onnxserve_usage_log_buffer_records",
    "onnxserve_usage_log_buffer_capacity_records",
    "onnxserve_usage_log_records_total",
    "onnxserve_usage_log_refused_total",
}
# OpenCost's metrics and their labels, as OpenCost registers them (pkg/costmodel/metrics.go); the
# scrape adds `job` (and, without honor_labels, would rename the clashing ones).
OPENCOST_LABELS = {
    "container_cpu_allocation": {"namespace", "pod", "container", "instance", "node"},
    "container_memory_allocation_bytes": {"namespace", "pod", "container", "instance", "node"},
    "container_gpu_allocation": {"namespace", "pod", "container", "instance", "node"},
    "node_cpu_hourly_cost": {"instance", "node", "instance_type", "region", "provider_id"},
    "node_ram_hourly_cost": {"instance", "node", "instance_type", "region", "provider_id"},
    "node_gpu_hourly_cost": {"instance", "node", "instance_type", "region", "provider_id"},
}
MODEL_RECORDED = {
    "model:onnxserve_cost_per_inference_dollars:rate5m",
    "model:onnxserve_cost_dollars_per_hour:rate5m",
    "model:onnxserve_request_duration_seconds:p50_5m",
    "model:onnxserve_request_duration_seconds:p99_5m",
    "model:onnxserve_queue_duration_seconds:p99_5m",
    "model:onnxserve_batch_size:avg_5m",
    "model:onnxserve_queue_depth:sum",
    "model:onnxserve_inferences:rate5m",
    "model:onnxserve_error_ratio:rate5m",
    "tenant_model:onnxserve_cost_dollars_per_hour:rate1h",
}
RECORDED = MODEL_RECORDED | {
    "tenant:onnxserve_cost_dollars_per_hour:rate1h",
    "tenant:onnxserve_budget_dollars_per_hour:max",
    "tenant:onnxserve_budget_used:ratio1h",
    "tenant_window:onnxserve_budget_used:ratio",
    "namespace_pod:opencost_cost_dollars_per_hour:sum",
    "namespace_pod_tenant:onnxserve_cost_share:ratio1h",
    "namespace_pod_tenant:opencost_cost_dollars_per_hour:sum",
    "tenant:opencost_cost_dollars_per_hour:sum",
}
ALERTS = {
    "OnnxserveHighErrorRatio",
    "OnnxserveHighP99Latency",
    "OnnxserveQueueSaturating",
    "OnnxserveCostPerInferenceOverBudget",
    "OnnxserveTenantOverBudget",
    "OnnxserveTenantBudgetNearlySpent",
    "OnnxserveUsageLogRefusing",
    "OnnxserveUsageLogBacklog",
    "OnnxserveTenantSeriesFolded",
    "OnnxserveUnauthenticatedRequests",
}
KNOWN_METRICS = MODEL_METRICS | DEVICE_METRICS | SERVER_METRICS | RECORDED
ALLOWED_VARIABLES = {"model", "__rate_interval"}
# Range windows in dashboard queries: Grafana's rate interval, or the hour that budgets are per.
ALLOWED_WINDOWS = {"$__rate_interval", "1h"}
UNITS = {"s", "reqps", "currencyUSD", "percentunit", "bytes", "watt", "none"}

IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
VARIABLE = re.compile(r"\$(?:\{([^}:]+)(?::[^}]*)?\}|\[\[([^\]:]+)(?::[^\]]*)?\]\]|(\w+))")


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False)


def assert_passes(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def test_prometheus_config_is_valid():
    assert_passes(promtool("check", "config", "prometheus.yml"))


@pytest.mark.parametrize("rules", [RECORDING_RULES.name, ALERT_RULES.name])
def test_rule_file_is_valid(rules):
    assert_passes(promtool("check", "rules", rules))


@pytest.mark.parametrize("tests", [RECORDING_TESTS.name, ALERT_TESTS.name])
def test_rule_unit_tests_pass(tests):
    assert_passes(promtool("test", "rules", tests))


def test_rule_files_define_the_documented_rules():
    recorded = set(re.findall(r"^\s*- record:\s*(\S+)", RECORDING_RULES.read_text(), re.MULTILINE))
    alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", ALERT_RULES.read_text(), re.MULTILINE))
    assert recorded == RECORDED
    assert alerts == ALERTS


def rule_exprs() -> list[tuple[str, str]]:
    groups = [group for path in (RECORDING_RULES, ALERT_RULES) for group in yaml.safe_load(path.read_text())["groups"]]
    return [(rule.get("record") or rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def test_rules_read_only_known_metrics():
    """Every series a rule reads is onnxserve's (the metrics contract), recorded by a rule, or
    one of OpenCost's; a misspelt metric would otherwise just record nothing."""
    functions_and_keywords = {
        "sum",
        "max",
        "rate",
        "increase",
        "histogram_quantile",
        "label_replace",
        "group",
        "by",
        "on",
        "group_left",
        "and",
        "or",
        "unless",
        "le",
        "ALERTS",
    }
    labels = {"model", "version", "tenant", "namespace", "pod", "container", "node", "outcome", "le", "window"}
    labels |= {"instance"}  # a replica: budgets are enforced per replica
    for name, expr in rule_exprs():
        unquoted = QUOTED.sub('""', re.sub(r"#.*", "", expr))
        unquoted = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", unquoted)  # selectors and windows
        names = set(IDENTIFIER.findall(unquoted)) - functions_and_keywords - labels
        unknown = names - KNOWN_METRICS - set(OPENCOST_LABELS)
        assert not unknown, f"{name} reads unknown series {sorted(unknown)}"


def test_opencost_test_series_carry_opencost_labels():
    """The synthetic OpenCost series in the unit tests have exactly the labels OpenCost exports
    (plus the scrape's job), so the joins are tested on what a real Prometheus holds."""
    seen = set()
    for case in yaml.safe_load(RECORDING_TESTS.read_text())["tests"]:
        for series in case["input_series"]:
            metric, _, selector = series["series"].partition("{")
            if metric in OPENCOST_LABELS:
                names = set(re.findall(r'(\w+)="', selector))
                assert names == OPENCOST_LABELS[metric] | {"job"}, series["series"]
                seen.add(metric)
    assert seen == set(OPENCOST_LABELS), f"OpenCost metrics without test data: {sorted(set(OPENCOST_LABELS) - seen)}"


@pytest.mark.parametrize(
    "tests, wrong",
    [
        # The OpenCost split of pod onnxserve-a for team-a (its first check), off in the last digit.
        (RECORDING_TESTS.name, ("value: 1.98358154296875", "value: 1.98358154296876")),
        # The folded-tenants alert expected at the wrong severity.
        (ALERT_TESTS.name, ("              severity: info", "              severity: warning")),
    ],
)
def test_rule_unit_tests_can_fail(tests, wrong, tmp_path):
    """promtool and this harness report a wrong expectation: a copy with one expected value
    changed fails."""
    for path in PROMETHEUS.glob("*.yml"):
        (tmp_path / path.name).write_text(path.read_text())
    original, broken = wrong
    text = (tmp_path / tests).read_text()
    assert original in text, original
    (tmp_path / tests).write_text(text.replace(original, broken, 1))
    binary = shutil.which("promtool") or pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run([binary, "test", "rules", tests], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr, result


def test_every_rule_has_unit_tests():
    tested = set(re.findall(r"^\s*- expr:\s*(\S+)\s*$", RECORDING_TESTS.read_text(), re.MULTILINE))
    assert RECORDED <= tested, f"recording rules without a test: {sorted(RECORDED - tested)}"

    # Each alert is checked both while it must not fire (exp_alerts: []) and while it fires.
    cases = re.split(r"^\s*- alertname:\s*", ALERT_TESTS.read_text(), flags=re.MULTILINE)[1:]
    silent, firing = set(), set()
    for case in cases:
        name = case.split()[0]
        (silent if re.search(r"exp_alerts:\s*\[\]", case) else firing).add(name)
    assert ALERTS <= silent, f"alerts never tested as not firing: {sorted(ALERTS - silent)}"
    assert ALERTS <= firing, f"alerts never tested as firing: {sorted(ALERTS - firing)}"


def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    nested = [inner for panel in panels for inner in panel.get("panels", [])]
    return [panel for panel in panels + nested if panel.get("type") != "row"]


def test_every_dashboard_panel_has_a_query_and_a_unit():
    panels = dashboard_panels()
    assert panels
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        exprs = [target.get("expr", "").strip() for target in panel.get("targets", [])]
        assert any(exprs), f"panel {panel['title']!r} has no query"
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit in UNITS, f"panel {panel['title']!r} has unit {unit!r}"


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr", "").strip()
    ]


def test_dashboard_queries_use_only_allowed_variables():
    for title, expr in dashboard_exprs():
        used = {next(group for group in match.groups() if group) for match in VARIABLE.finditer(expr)}
        assert used <= ALLOWED_VARIABLES, f"{title!r} uses {sorted(used - ALLOWED_VARIABLES)}: {expr}"
        # Every range window is $__rate_interval, or the budgets' hour.
        windows = re.findall(r"\[([^\]]*)\]", QUOTED.sub('""', expr))
        assert set(windows) <= ALLOWED_WINDOWS, f"{title!r}: {expr}"


def test_dashboard_queries_use_only_known_metrics_and_filter_by_model():
    for title, expr in dashboard_exprs():
        unquoted = QUOTED.sub('""', expr)
        metrics = {name for name in IDENTIFIER.findall(unquoted) if "onnxserve" in name}
        assert metrics, f"{title!r} queries no onnxserve metric: {expr}"
        assert metrics <= KNOWN_METRICS, f"{title!r} queries unknown {sorted(metrics - KNOWN_METRICS)}: {expr}"
        # A metric with a model label is always selected with model=~"$model".
        for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", expr):
            name, selector = match.groups()
            if name in MODEL_METRICS or name in MODEL_RECORDED:
                assert selector and 'model=~"$model"' in selector, f"{title!r}: {name} without the model filter"


def test_dashboard_model_variable():
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(onnxserve_model_ready, model)"
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
