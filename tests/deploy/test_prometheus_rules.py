"""The Prometheus configuration, rules and rule unit tests in deploy/prometheus pass promtool,
every rule has unit tests, and the Grafana dashboard queries only known metrics and variables."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
RECORDED = {
    "model:onnxserve_cost_per_inference_dollars:rate5m",
    "model:onnxserve_cost_dollars_per_hour:rate5m",
    "model:onnxserve_request_duration_seconds:p50_5m",
    "model:onnxserve_request_duration_seconds:p99_5m",
    "model:onnxserve_queue_duration_seconds:p99_5m",
    "model:onnxserve_batch_size:avg_5m",
    "model:onnxserve_queue_depth:sum",
    "model:onnxserve_inferences:rate5m",
    "model:onnxserve_error_ratio:rate5m",
}
ALERTS = {
    "OnnxserveHighErrorRatio",
    "OnnxserveHighP99Latency",
    "OnnxserveQueueSaturating",
    "OnnxserveCostPerInferenceOverBudget",
}
KNOWN_METRICS = MODEL_METRICS | DEVICE_METRICS | RECORDED
ALLOWED_VARIABLES = {"model", "__rate_interval"}
UNITS = {"s", "reqps", "currencyUSD", "percentunit", "bytes", "watt", "none"}

IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
VARIABLE = re.compile(r"\$(?:\{([^}:]+)(?::[^}]*)?\}|\[\[([^\]:]+)(?::[^\]]*)?\]\]|(\w+))")


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )


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
        # Every range window is $__rate_interval.
        windows = re.findall(r"\[([^\]]*)\]", QUOTED.sub('""', expr))
        assert all(window == "$__rate_interval" for window in windows), f"{title!r}: {expr}"


def test_dashboard_queries_use_only_known_metrics_and_filter_by_model():
    for title, expr in dashboard_exprs():
        unquoted = QUOTED.sub('""', expr)
        metrics = {name for name in IDENTIFIER.findall(unquoted) if "onnxserve" in name}
        assert metrics, f"{title!r} queries no onnxserve metric: {expr}"
        assert metrics <= KNOWN_METRICS, f"{title!r} queries unknown {sorted(metrics - KNOWN_METRICS)}: {expr}"
        # A metric with a model label is always selected with model=~"$model".
        for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", expr):
            name, selector = match.groups()
            if name in MODEL_METRICS or name in RECORDED:
                assert selector and 'model=~"$model"' in selector, f"{title!r}: {name} without the model filter"


def test_dashboard_model_variable():
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(onnxserve_model_ready, model)"
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
