"""Several front-end processes under faults and at the edges: a front end killed with SIGKILL under
load (the server keeps serving, each request is billed once, nothing leaks), SIGTERM under load
(every accepted request answered), every process's series on the one /metrics port, and TLS and
restricted protocols the same in every front end."""

import asyncio
import collections
import functools
import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.attacks import close_all, connect, recv_or_reset
from tests.certificates import make_certificates
from tests.conftest import wait_until
from tests.integration.test_batching import caller_rows, inputs
from tests.integration.test_frontends import OWN_CONNECTION, children, parameters
from tests.integration.test_tenants import BATCHING, KEYS, PRICE, bearer, plus_one, write_keys
from tests.integration.test_tls import gevent_context, tls_flags
from tests.tenant_load import TenantLoad

TENANTS = {tenant: bearer(key) for key, tenant in KEYS.items()}
SHUTTING_DOWN = "StatusCode.UNAVAILABLE"  # what a caller gets from a server that is going or gone


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def shared_memory_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def served_by_both(load: TenantLoad) -> bool:
    return {result.frontend for result in load.ok().values()} == {1, 2}


def test_a_front_end_killed_under_load_bills_each_request_once_and_leaks_nothing(tmp_path, serve):
    log = tmp_path / "usage.log"
    keys = write_keys(tmp_path / "keys.json", KEYS)
    flags = ("--frontends", "2", "--api-keys", str(keys), "--usage-log", str(log), *PRICE)
    server = serve(plus_one(tmp_path, BATCHING), *flags)
    engine = server.process.pid
    fds, shared = open_fds(engine), shared_memory_entries()
    load = TenantLoad(server.url, "plus", TENANTS, callers=4, own_connections=True).start()
    assert wait_until(lambda: served_by_both(load) and len(load.ok()) > 100, timeout=30)
    os.kill(children(engine)[0], signal.SIGKILL)
    assert wait_until(lambda: "exited with -9: restarting it" in server.log_text(), timeout=10)
    killed_at = len(load.ok())
    assert wait_until(lambda: len(children(engine)) == 2 and len(load.ok()) > killed_at + 200, timeout=30)
    load.stop()
    assert not load.wrong
    assert {result.outcome for result in load.results.values()} <= {"ok", SHUTTING_DOWN}
    assert wait_until(lambda: open_fds(engine) == fds, timeout=10), f"{open_fds(engine)} fds, {fds} before"
    assert shared_memory_entries() == shared
    samples = server.samples()
    assert samples.get("onnxserve_frontend_restarts_total") == 1
    assert server.stop() == 0

    written = records(log)
    per_request = collections.Counter(record["request_id"] for record in written)
    assert set(per_request.values()) == {1}, "each request is recorded, and billed, once"
    by_id = {record["request_id"]: record for record in written}
    for request_id, result in load.ok().items():
        assert by_id[request_id]["outcome"] == "ok" and by_id[request_id]["cost_dollars"] == result.cost
    lost = [by_id.get(request_id) for request_id, result in load.results.items() if result.outcome != "ok"]
    # Lost with the front end: cancelled in the engine, or answered by it and lost on the way (billed
    # and counted as answered, as one process counts an answer handed to gRPC whose caller then
    # vanished), or never in the engine at all (no record). Each once.
    assert {record["outcome"] for record in lost if record} <= {"cancelled", "ok"}
    billed = sum(record["cost_dollars"] or 0.0 for record in written)
    assert billed == pytest.approx(samples.get("onnxserve_cost_dollars_total", model="plus", version="1", device="cpu"))


def test_sigterm_under_load_answers_every_accepted_request(tmp_path, serve):
    log = tmp_path / "usage.log"
    keys = write_keys(tmp_path / "keys.json", KEYS)
    flags = ("--frontends", "2", "--api-keys", str(keys), "--usage-log", str(log), "--exit-timeout-secs", "20")
    server = serve(plus_one(tmp_path, BATCHING), *flags)
    load = TenantLoad(server.url, "plus", TENANTS, callers=4, own_connections=True).start()
    assert wait_until(lambda: served_by_both(load) and len(load.ok()) > 100, timeout=30)
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    load.stop()
    assert not load.wrong
    # CANCELLED: calls that gRPC's core had received but not yet handed to the server's code when
    # it stopped (grpc/grpc#41785: they should say UNAVAILABLE); one process does the same.
    assert {result.outcome for result in load.results.values()} <= {"ok", SHUTTING_DOWN, "StatusCode.CANCELLED"}
    written = records(log)
    recorded = {record["request_id"] for record in written}
    never_reached = {key for key, result in load.results.items() if result.outcome == "StatusCode.CANCELLED"}
    assert not never_reached & recorded, "a request the server took in was answered"
    outcomes = collections.Counter(record["outcome"] for record in written)
    assert set(outcomes) <= {"ok", "rejected"}, f"accepted requests that were not answered: {outcomes}"
    ok = {record["request_id"] for record in written if record["outcome"] == "ok"}
    assert ok == set(load.ok()), "every request answered in the log was answered to its caller, and no other"


def test_every_processs_series_are_on_the_one_metrics_port(tmp_path, serve):
    server = serve(plus_one(tmp_path), "--frontends", "2")
    too_long = "/v2/" + "a" * 9000
    for _ in range(12):  # new connections: the kernel spreads them over both front ends' accepts
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{server.http_url}{too_long}", timeout=10)
        assert refused.value.code == 414
        refused.value.close()
    text = server.metrics()
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families)), "one family per name"
    samples = server.samples()
    assert samples.get("onnxserve_connections_dropped_total", listener="http", reason="url_too_long") == 12
    assert samples.get("onnxserve_connections_open", listener="metrics") == 1  # this scrape's
    for frontend in ("1", "2"):
        assert samples.get("onnxserve_frontend_cpu_seconds_total", frontend=frontend) > 0
        assert samples.get("onnxserve_frontend_resident_memory_bytes", frontend=frontend) > 10e6
    assert samples.get("onnxserve_frontend_restarts_total") == 0
    assert samples.get("process_resident_memory_bytes") > 10e6  # the engine's own, as in one process


def test_tls_and_restricted_protocols_hold_in_every_front_end(tmp_path, serve):
    certs = make_certificates(tmp_path / "certs")
    flags = [*tls_flags(certs, "grpc"), *tls_flags(certs, "http")]
    restricted = ("--grpc-restricted-protocol", "model-repository:admin-key=s3cret")
    restricted += ("--http-restricted-api", "model-repository:admin-key=s3cret")
    server = serve(plus_one(tmp_path), "--frontends", "2", *flags, *restricted)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    seen = set()
    for _ in range(16):  # new connections, spread over both front ends
        client = grpcclient.InferenceServerClient(
            server.url, ssl=True, root_certificates=str(certs.ca.cert), channel_args=OWN_CONNECTION
        )
        tensor = grpcclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("plus", [tensor])
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
        seen.add(parameters(result)["onnxserve_frontend"])
        with pytest.raises(InferenceServerException) as denied:
            client.get_model_repository_index()
        assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
        assert client.get_model_repository_index(headers={"admin-key": "s3cret"}).models
        client.close()
    assert seen == {1, 2}
    for _ in range(8):  # REST: one socket that every front end accepts on
        factory = functools.partial(gevent_context, certs)
        client = httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_context_factory=factory, insecure=True)
        with pytest.raises(InferenceServerException, match="restricted") as refused:
            client.get_model_repository_index()
        assert refused.value.status() == "403"
        assert client.get_model_repository_index(headers={"admin-key": "s3cret"})
        client.close()


WIDE = 32768  # 128 KiB a row of FP32: past link_shm.MIN_BYTES, through shared memory both ways


def frontends_tensors(engine: int) -> list[str]:
    pids = {str(pid) for pid in children(engine)}
    return [name for name in shared_memory_entries() if name.split("-")[1:2] and name.split("-")[1] in pids]


async def eventually(predicate, timeout: float) -> bool:
    """wait_until for a coroutine: the loop keeps running meanwhile."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_big_tensors_cross_in_shared_memory_and_none_is_left_when_a_front_end_dies(tmp_path, serve):
    root = tmp_path / "repository"
    onnx_models.write(root, "wide", onnx_models.add_one(("batch", WIDE)), "max_batch_size: 8")
    server = serve(root, "--frontends", "2")
    engine, before = server.process.pid, shared_memory_entries()
    stopping = asyncio.Event()
    answered, failures = collections.Counter(), []

    async def caller(number: int) -> None:
        client = aioclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
        try:
            while not stopping.is_set():
                x = caller_rows(number, 1 + number % 2, WIDE)
                try:
                    result = await client.infer("wide", inputs(x))
                except InferenceServerException as err:
                    failures.append(err.status())
                    await asyncio.sleep(0.01)
                    continue
                np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
                answered[parameters(result)["onnxserve_frontend"]] += 1
        finally:
            await client.close()

    async def scenario() -> None:
        callers = [asyncio.create_task(caller(number)) for number in range(8)]
        assert await eventually(lambda: set(answered) == {1, 2} and sum(answered.values()) > 50, timeout=30)
        os.kill(children(engine)[0], signal.SIGKILL)
        assert await eventually(lambda: "exited with -9: restarting it" in server.log_text(), timeout=10)
        served = sum(answered.values())
        assert await eventually(lambda: len(children(engine)) == 2 and sum(answered.values()) > served + 50, 30)
        stopping.set()
        await asyncio.gather(*callers)

    asyncio.run(scenario())
    assert set(failures) <= {SHUTTING_DOWN}
    assert wait_until(lambda: shared_memory_entries() == before, timeout=10), frontends_tensors(engine)
    assert server.stop() == 0


def test_connection_bounds_are_the_servers_not_each_front_ends(tmp_path, serve):
    """--http-max-connections 8 with two front ends: 4 each, 8 at most in all, as in one process;
    the rest are refused (503) and counted on the one /metrics."""
    flags = ("--frontends", "2", "--http-max-connections", "8", "--http-header-timeout-secs", "1")
    server = serve(plus_one(tmp_path), *flags)
    sockets = connect(server.http_port, 28)
    try:
        first = [recv_or_reset(sock, 64) for sock in sockets]  # at once for the refused, at the timeout for others
    finally:
        close_all(sockets)
    turned_away = sum(answer.startswith(b"HTTP/1.1 503") for answer in first)
    assert turned_away >= 28 - 8, first
    assert server.samples().get("onnxserve_connections_refused_total", listener="http") == turned_away
