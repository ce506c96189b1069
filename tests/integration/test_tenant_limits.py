"""Tenant limits as an operator writes them (--tenant-limits, YAML), enforced on real servers: rates
with bursts, requests in flight, spend budgets from the same numbers the usage log bills, the file
changed while serving, a restart in the middle of a window, and bad files refused at start."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.conftest import ROOT, wait_until
from tests.integration.test_batching import inputs as slow_inputs
from tests.integration.test_tenants import PRICE, plus_one

HEADER = "x-tenant-id"


def limits_file(path, text: str):
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)  # as an operator (or a ConfigMap update) would: never half written
    return path


def as_tenant(tenant: str) -> dict[str, str]:
    return {HEADER: tenant}


def plus(client, tenant: str, module=grpcclient, rows: int = 1):
    x = np.ones((rows, 4), dtype=np.float32)
    tensor = module.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer("plus", [tensor], headers=as_tenant(tenant))


def outcome(call) -> str:
    try:
        call()
    except InferenceServerException as err:
        return f"{err.status()}: {err.message()}"
    return "ok"


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_rate_with_a_burst_refuses_the_excess_at_once_and_other_tenants_are_untouched(tmp_path, serve):
    limits = limits_file(
        tmp_path / "limits.yaml", "tenants:\n  flood:\n    requests_per_second: 2\n    request_burst: 4\n"
    )
    log = tmp_path / "usage.jsonl"
    server = serve(plus_one(tmp_path), "--trust-tenant-header", "--tenant-limits", str(limits), "--usage-log", str(log))
    client = grpcclient.InferenceServerClient(server.url)
    answers = [outcome(lambda: plus(client, "flood")) for _ in range(20)]
    assert answers[:4] == ["ok"] * 4  # the burst
    refused = [answer for answer in answers if answer != "ok"]
    assert len(refused) >= 5 and all(answer.startswith("StatusCode.RESOURCE_EXHAUSTED") for answer in refused)
    assert "tenant 'flood'" in refused[0] and "requests_per_second" in refused[0] and "resets in" in refused[0]
    assert [outcome(lambda: plus(client, "calm")) for _ in range(10)] == ["ok"] * 10  # no limit: the default's none

    rest = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as error:
        for _ in range(10):
            plus(rest, "flood", httpclient)
    assert error.value.status() == "429"
    time.sleep(1.0)  # two tokens back
    assert outcome(lambda: plus(client, "flood")) == "ok"
    counted = server.metric("onnxserve_tenant_refused_total", tenant="flood", reason="requests_per_second")
    assert counted >= len(refused) + 1
    assert wait_until(lambda: sum(r["outcome"] == "refused" for r in records(log)) >= len(refused) + 1)
    refused_records = [r for r in records(log) if r["outcome"] == "refused"]
    assert all(r["tenant"] == "flood" and not r["cost_dollars"] for r in refused_records)  # refused: costs nothing


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_rest_says_when_to_retry_and_grpc_is_refused_alike_through_front_ends(tmp_path, serve, frontends):
    limits = limits_file(tmp_path / "limits.json", json.dumps({"default": {"requests_per_second": 1}}))
    flags = ("--trust-tenant-header", "--tenant-limits", str(limits), "--frontends", frontends)
    server = serve(plus_one(tmp_path), *flags)
    client = grpcclient.InferenceServerClient(server.url)
    answers = [outcome(lambda: plus(client, "g")) for _ in range(3)]
    assert answers[0] == "ok" and answers[-1].startswith("StatusCode.RESOURCE_EXHAUSTED: tenant 'g' is refused")
    import urllib.error
    import urllib.request

    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    statuses = []
    for _ in range(3):
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/plus/infer", data=body.encode(), headers=as_tenant("t")
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                statuses.append((response.status, None))
        except urllib.error.HTTPError as err:
            statuses.append((err.code, err.headers.get("retry-after")))
    assert statuses[0] == (200, None)
    assert statuses[-1][0] == 429 and int(statuses[-1][1]) >= 1


def test_requests_in_flight_are_capped_per_tenant(tmp_path, serve):
    repository = tmp_path / "models"
    config = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 0 }"
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), config)
    limits = limits_file(tmp_path / "limits.yaml", "default:\n  max_in_flight: 2\n")
    server = serve(repository, "--trust-tenant-header", "--tenant-limits", str(limits))

    def slow_call(tenant: str) -> str:
        client = grpcclient.InferenceServerClient(server.url)
        x = np.ones((1, 4), dtype=np.float32)
        tensors = slow_inputs(x, module=grpcclient, work=3000)
        return outcome(lambda: client.infer("slow", tensors, headers=as_tenant(tenant)))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(slow_call, ["a"] * 5 + ["b"]))
    assert answers[-1] == "ok"  # the other tenant has its own two
    assert answers[:5].count("ok") >= 2 and sum("max_in_flight" in answer for answer in answers[:5]) >= 1
    assert server.metric("onnxserve_tenant_in_flight_requests", tenant="a") == 0


def test_a_budget_stops_a_tenant_within_the_cost_of_what_was_in_flight_and_not_before(tmp_path, serve):
    log = tmp_path / "usage.jsonl"
    budget = 0.002  # dollars this hour: a few dozen requests at $36 an hour of CPU
    limits = limits_file(tmp_path / "limits.yaml", f"tenants:\n  spender:\n    budget_dollars: {{hour: {budget}}}\n")
    server = serve(
        plus_one(tmp_path),
        "--trust-tenant-header",
        "--tenant-limits",
        str(limits),
        "--usage-log",
        str(log),
        "--usage-log-fsync-ms",
        "20",
        *PRICE,
    )

    def spend_until_refused(tenant: str) -> list[str]:
        client = grpcclient.InferenceServerClient(server.url)
        seen = []
        for _ in range(3000):
            seen.append(outcome(lambda: plus(client, tenant, rows=4)))
            if seen[-1] != "ok" or (tenant != "spender" and len(seen) >= 200):
                break
        return seen

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        runs = list(pool.map(spend_until_refused, ["spender"] * 4 + ["bystander"]))
    assert all(run[-1].startswith("StatusCode.RESOURCE_EXHAUSTED") and "budget_hour" in run[-1] for run in runs[:4])
    assert runs[4] == ["ok"] * len(runs[4])  # another tenant goes on
    assert wait_until(lambda: sum(r["outcome"] in ("ok", "refused") for r in records(log)) >= sum(map(len, runs)))
    billed = [r for r in records(log) if r["tenant"] == "spender" and r["outcome"] == "ok"]
    spent = sum(r["cost_dollars"] for r in billed)
    largest = max(r["cost_dollars"] for r in billed)
    assert spent >= budget  # nothing was refused before the budget was spent
    assert spent <= budget + 4 * largest * 2  # at most what the four callers had in flight when it was reached
    assert server.metric("onnxserve_tenant_spend_dollars", tenant="spender", window="hour") == pytest.approx(spent)
    assert server.metric("onnxserve_tenant_budget_dollars", tenant="spender", window="hour") == budget

    server.stop()  # a restart in the middle of the window keeps what was spent
    again = serve(plus_one(tmp_path), "--trust-tenant-header", "--tenant-limits", str(limits), "--usage-log", str(log))
    client = grpcclient.InferenceServerClient(again.url)
    assert "budget_hour" in outcome(lambda: plus(client, "spender"))
    assert outcome(lambda: plus(client, "bystander")) == "ok"


def test_the_limits_file_changed_while_serving_applies_and_a_broken_one_keeps_the_last(tmp_path, serve):
    limits = limits_file(tmp_path / "limits.yaml", "default:\n  requests_per_second: 1000\n")
    server = serve(plus_one(tmp_path), "--trust-tenant-header", "--tenant-limits", str(limits))
    client = grpcclient.InferenceServerClient(server.url)
    assert [outcome(lambda: plus(client, "t")) for _ in range(5)] == ["ok"] * 5
    limits_file(limits, "default:\n  requests_per_second: 1\n  request_burst: 1\n")

    def limited() -> bool:
        return any(outcome(lambda: plus(client, "t")) != "ok" for _ in range(3))

    assert wait_until(limited, timeout=10)
    limits_file(limits, "default:\n  requests_per_second: -5\n")
    assert wait_until(lambda: any("tenant limits" in line and "requests_per_second" in line for line in server.log))
    assert limited()  # the previous limits stay


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("default:\n  requests_per_second: -1\n", "default.requests_per_second"),
        ("tenants:\n  team-a:\n    budget_dollars: {week: 3}\n", "budget_dollars"),
        ("tenants:\n  team-a:\n    colour: red\n", "colour"),
        ("limits: {}\n", "limits"),
    ],
)
def test_a_bad_limits_file_stops_the_start_naming_the_file_and_field(tmp_path, text, named):
    limits = limits_file(tmp_path / "limits.yaml", text)
    command = [sys.executable, "-m", "server", "--model-repository", str(plus_one(tmp_path)), "--grpc-port", "0"]
    command += ["--metrics-port", "0", "--http-port", "-1", "--tenant-limits", str(limits)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(limits) in done.stderr and named in done.stderr
