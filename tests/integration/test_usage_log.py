"""The usage log under real load: its totals equal /metrics, SIGTERM loses no record, SIGKILL
leaves whole records of answered requests, and a log that cannot keep up refuses new requests
instead of serving them unbilled."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.tools.usage import read
from tests import onnx_models
from tests.conftest import ROOT, wait_until
from tests.integration.test_batching import caller_rows, inputs
from tests.integration.test_metrics import BLOCKING_WORK, SLOW_CONFIG
from tests.integration.test_tenants import (
    BATCHING,
    INFER_BODY,
    KEYS,
    PRICE,
    bearer,
    grpc_infer,
    http_call,
    plus_one,
    write_keys,
)
from tests.tenant_load import TenantLoad

TENANTS = {tenant: bearer(key) for key, tenant in KEYS.items()}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def usage_report(*paths) -> dict:
    """`onnxserve usage --format json`, run as a user would."""
    command = [
        sys.executable,
        "-c",
        "import sys; from server.__main__ import main; sys.argv[0] = 'onnxserve'; sys.exit(main())",
    ]
    done = subprocess.run(
        [*command, "usage", "--format", "json", *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("frontends", [1, 2])
def test_usage_records_add_up_to_the_metrics(tmp_path, serve, frontends):
    """In one process, and with the requests spread over two front-end processes (each caller on
    a connection of its own), whose engine alone bills them and writes the log."""
    log = tmp_path / "usage.log"
    keys = write_keys(tmp_path / "keys.json", KEYS)
    flags = ("--api-keys", str(keys), "--usage-log", str(log), "--frontends", str(frontends), *PRICE)
    server = serve(plus_one(tmp_path, BATCHING), *flags)
    # 12 connections: the kernel's SO_REUSEPORT hash leaves one front end without any once in 2,048 runs
    callers = 4
    load = TenantLoad(server.url, "plus", TENANTS, callers=callers, requests=30, own_connections=frontends > 1).run()
    assert {result.frontend for result in load.results.values()} == ({1, 2} if frontends > 1 else {0})
    client = server.client()
    bad = grpcclient.InferInput("x", [1, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="plus"):
        client.infer("plus", [bad], headers=bearer("key-of-b"), request_id="bad-shape")
    with pytest.raises(InferenceServerException):
        client.infer("absent", [bad], headers=bearer("key-of-b"), request_id="no-such-model")
    assert http_call(server, "/v2/models/plus/infer", bearer("key-of-c"), INFER_BODY)[0] == 200
    samples = server.samples()
    assert server.stop() == 0

    written = records(log)
    assert len(written) == len(TENANTS) * callers * 30 + 3
    assert len({(r["server"], r["seq"]) for r in written}) == len(written)
    by_id = {r["request_id"]: r for r in written if r["request_id"]}
    for request_id, result in load.results.items():  # each caller was told what its record says
        assert by_id[request_id]["outcome"] == "ok" and by_id[request_id]["tenant"] == result.tenant
        assert by_id[request_id]["cost_dollars"] == result.cost and by_id[request_id]["batch_id"] == result.batch_id
    assert by_id["bad-shape"]["outcome"] == "invalid" and by_id["bad-shape"]["cost_dollars"] is None
    assert by_id["no-such-model"]["model"] == "absent"
    assert {r["protocol"] for r in written} == {"grpc", "http"}
    assert all(
        r["price_dollars_per_hour"] == 36 and r["price_source"] == "flag" for r in written if r["outcome"] == "ok"
    )

    report = usage_report(log)
    assert report["records"] == len(written) and not report["torn"] and not report["corrupt"]
    for row in report["tenant_models"]:
        if row["model"] != "plus":
            continue  # an unknown model has no series: its name would be unbounded
        labels = {"tenant": row["tenant"], "model": "plus", "version": "1"}
        for outcome, count in row["outcomes"].items():
            assert samples.get("onnxserve_tenant_requests_total", outcome=outcome, **labels) == count
        assert samples.total("onnxserve_tenant_requests_total", **labels) == row["requests"]
        assert samples.get("onnxserve_tenant_inferences_total", **labels) == row["inferences"]
        assert samples.get("onnxserve_tenant_cost_dollars_total", device="cpu", **labels) == pytest.approx(
            row["cost_dollars"], rel=1e-12
        )
    assert sum(row["cost_dollars"] for row in report["tenants"]) == pytest.approx(
        samples.get("onnxserve_cost_dollars_total", model="plus", version="1", device="cpu"), rel=1e-9
    )
    assert samples.get("onnxserve_usage_log_refused_total") == 0


def test_sigterm_under_load_loses_no_record(tmp_path, serve):
    log = tmp_path / "usage.log"
    server = serve(
        plus_one(tmp_path, BATCHING), "--trust-tenant-header", "--usage-log", str(log), "--usage-log-fsync-ms", "1000"
    )
    groups = {tenant: {"x-tenant-id": tenant} for tenant in KEYS.values()}
    load = TenantLoad(server.url, "plus", groups, callers=6).start()
    assert wait_until(lambda: len(load.results) > 300, timeout=30)
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    load.stop()

    written = {r["request_id"]: r for r in records(log)}
    answered = {request_id for request_id, result in load.results.items() if result.outcome == "ok"}
    assert len(answered) > 300
    assert {request_id for request_id, r in written.items() if r["outcome"] == "ok"} == answered
    assert len(written) == len(records(log)), "one record per request"


def test_sigkill_under_load_leaves_whole_records_of_answered_requests(tmp_path, serve):
    log = tmp_path / "usage.log"
    repository = plus_one(tmp_path, BATCHING)
    flags = ("--trust-tenant-header", "--usage-log", str(log), "--usage-log-fsync-ms", "50")
    server = serve(repository, *flags)
    load = TenantLoad(server.url, "plus", {"team-a": {"x-tenant-id": "team-a"}}, callers=8).start()
    assert wait_until(lambda: len(load.results) > 300, timeout=30)
    server.process.kill()
    killed = time.monotonic()
    server.wait(10)
    load.stop()

    summary = read([log])
    assert not summary.corrupt and len(summary.torn) <= 1
    written = [json.loads(line) for line in log.read_bytes().split(b"\n")[: summary.records]]
    logged = {r["request_id"] for r in written}
    assert logged <= set(load.sent), "only requests that were made"
    answered = {request_id: result for request_id, result in load.results.items() if result.outcome == "ok"}
    missing = [result.answered_at for request_id, result in answered.items() if request_id not in logged]
    assert all(killed - at < 1.0 for at in missing), "lost: only the last moments before the kill"
    unanswered = logged - set(answered)
    assert len(unanswered) <= 8, "logged but not answered: at most the requests in flight at the kill"

    again = serve(repository, *flags)  # the next start cuts a torn tail, then appends whole lines
    grpc_infer(again.client(), headers={"x-tenant-id": "team-b"})
    assert again.stop() == 0
    summary = read([log])
    assert not summary.torn and not summary.corrupt and summary.records == len(written) + 1
    assert list(summary.tenants) == ["team-a", "team-b"]


def test_a_full_usage_buffer_refuses_requests_rather_than_dropping_records(tmp_path, serve):
    fifo = tmp_path / "usage.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that does not read yet: the pipe fills
    server = serve(
        plus_one(tmp_path), "--usage-log", str(fifo), "--usage-log-buffer-records", "16", "--usage-log-fsync-ms", "5"
    )
    client = server.client()
    accepted, refusal = 0, None
    for _ in range(5000):
        try:
            grpc_infer(client, rows=1)
            accepted += 1
        except InferenceServerException as err:
            refusal = err
            break
    assert refusal is not None, "the pipe (64 KiB) and the buffer (16) filled"
    assert str(refusal.status()) == "StatusCode.UNAVAILABLE" and "usage log is behind" in refusal.message()
    samples = server.samples()
    assert samples.get("onnxserve_usage_log_refused_total") >= 1
    assert samples.get("onnxserve_usage_log_buffer_records") == 16
    assert (
        samples.get("onnxserve_tenant_requests_total", tenant="unknown", model="plus", version="1", outcome="ok")
        == accepted
    )

    lines: list[bytes] = []
    os.set_blocking(reader, True)
    drained = threading.Thread(target=lambda: lines.extend(_read_all(reader).splitlines()))
    drained.start()
    assert wait_until(lambda: _accepted(client), timeout=10), "the log caught up: requests are accepted again"
    accepted += 1
    assert server.stop() == 0  # closes the write end: the reader sees the end
    drained.join(10)
    os.close(reader)
    assert len(lines) == accepted, "every accepted request has its record; refused ones have none"
    assert all(json.loads(line)["outcome"] == "ok" for line in lines)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _accepted(client) -> bool:
    try:
        grpc_infer(client, rows=1)
    except InferenceServerException:
        return False
    return True


def test_a_caller_gone_while_its_batch_runs_still_pays_and_is_recorded(tmp_path, serve):
    log = tmp_path / "usage.log"
    repository = tmp_path / "models"
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), SLOW_CONFIG)
    server = serve(repository, "--trust-tenant-header", "--usage-log", str(log), *PRICE)
    client = server.client()
    x = caller_rows(0, 1)
    with pytest.raises(InferenceServerException, match="Deadline"):  # gives up a tenth of the way in
        client.infer(
            "slow",
            inputs(x, module=grpcclient, work=BLOCKING_WORK),
            request_id="gone",
            headers={"x-tenant-id": "team-gone"},
            client_timeout=0.1,
        )
    assert wait_until(
        lambda: server.samples().get("onnxserve_batches_total", model="slow", version="1") == 1, timeout=30
    )
    samples = server.samples()
    paid = samples.get(
        "onnxserve_tenant_cost_dollars_total", tenant="team-gone", model="slow", version="1", device="cpu"
    )
    assert paid > 0 and paid == pytest.approx(
        samples.get("onnxserve_cost_dollars_total", model="slow", version="1", device="cpu"), rel=1e-9
    )
    assert server.stop() == 0
    (record,) = records(log)
    assert (record["request_id"], record["tenant"], record["outcome"]) == ("gone", "team-gone", "cancelled")
    assert record["batch_id"] is not None and record["cost_dollars"] == pytest.approx(paid, rel=1e-12)
