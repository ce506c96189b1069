"""Several front-end processes over one engine (--frontends N): every caller gets its own rows
whichever front end it reaches, requests through different front ends share batches, a model
loaded through one is served by all, a front end killed under load is replaced while the others
serve, and SIGTERM stops them all."""

import asyncio
import collections
import json
import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from server.engine.cpus import cpu_cores
from server.frontends import FEWEST_CORES_TO_SPLIT
from tests import onnx_models
from tests.conftest import wait_until
from tests.integration.test_batching import BLOCKING_WORK, SLOW_CONFIG, caller_rows, inputs
from tests.integration.test_tenants import KEYS, bearer, write_keys

CONFIG = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 20000 }"
CALLERS = 48
# A connection of its own per client: grpc shares one between channels to the same address.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def repository(tmp_path):
    root = tmp_path / "repository"
    onnx_models.write(root, "add_one", onnx_models.add_one(), CONFIG)
    return root


def parameters(result) -> dict:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in result.get_response().parameters.items()
    }


async def grpc_caller(url: str, caller: int) -> tuple[int, int]:
    """One caller on a connection of its own; (front end, batch id) of its answer."""
    client = aioclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
    try:
        x = caller_rows(caller, 1 + caller % 3)
        result = await client.infer("add_one", inputs(x))
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
        said = parameters(result)
        return said["onnxserve_frontend"], said["onnxserve_batch_id"]
    finally:
        await client.close()


def rest_caller(url: str, caller: int) -> int:
    x = caller_rows(caller, 2)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    request = urllib.request.Request(f"http://{url}/v2/models/add_one/infer", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    np.testing.assert_array_equal(np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(x.shape), x + 1)
    return answer["parameters"]["onnxserve_frontend"]


def test_callers_get_their_own_rows_and_share_batches_across_front_ends(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2")

    async def everyone():
        return await asyncio.gather(*(grpc_caller(server.url, caller) for caller in range(CALLERS)))

    answered = asyncio.run(everyone())
    assert {frontend for frontend, _ in answered} == {1, 2}, "the kernel spread connections over both"
    by_batch: dict[int, set[int]] = {}
    for frontend, batch in answered:
        by_batch.setdefault(batch, set()).add(frontend)
    assert any(len(frontends) == 2 for frontends in by_batch.values()), "no batch mixed the front ends"
    served_by = {rest_caller(server.http_url, caller) for caller in range(CALLERS, CALLERS + 16)}
    assert served_by <= {1, 2}
    rows = sum(1 + caller % 3 for caller in range(CALLERS)) + 2 * 16
    assert server.samples().get("onnxserve_inferences_total", model="add_one", version="1") == rows


def test_a_stream_through_a_front_end_answers_each_request(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2")
    answers: list = []
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(lambda result, error: answers.append(error or result))
    for caller in range(20):
        client.async_stream_infer("add_one", inputs(caller_rows(caller, 1), grpcclient), request_id=str(caller))
    assert wait_until(lambda: len(answers) >= 20, timeout=30)
    client.stop_stream()
    for answer in answers:
        caller = int(answer.get_response().id)
        np.testing.assert_array_equal(answer.as_numpy("y"), caller_rows(caller, 1) + 1)


def test_a_model_loaded_through_one_front_end_serves_through_all(tmp_path, serve):
    root = repository(tmp_path)
    onnx_models.write(root, "other", onnx_models.add_one(), CONFIG)
    server = serve(root, "--frontends", "2", "--model-control-mode", "explicit", "--load-model", "add_one")
    grpcclient.InferenceServerClient(server.url).load_model("other")
    for _ in range(8):  # new connections, spread over both front ends
        client = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
        assert client.is_model_ready("other")
        x = caller_rows(1, 1)
        np.testing.assert_array_equal(client.infer("other", inputs(x, grpcclient)).as_numpy("y"), x + 1)
        client.close()


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_front_end_is_replaced_while_the_others_serve(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2")
    started = children(server.process.pid)
    assert len(started) == 2
    os.kill(started[0], signal.SIGKILL)
    x = caller_rows(3, 1)

    def served() -> bool:
        client = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
        try:
            return bool(np.array_equal(client.infer("add_one", inputs(x, grpcclient)).as_numpy("y"), x + 1))
        finally:
            client.close()

    # Gone once reaped: until then the kernel may still queue a new connection on its socket (and
    # reset it), as it does for any process that dies listening with SO_REUSEPORT.
    assert wait_until(lambda: "exited with -9: restarting it" in server.log_text(), timeout=10)
    assert all(served() for _ in range(10))  # the other front end, alone until the restart
    assert wait_until(lambda: len(children(server.process.pid)) == 2, timeout=20)
    assert all(served() for _ in range(10))
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0


def test_api_keys_name_the_tenant_in_every_front_end(tmp_path, serve):
    keys = write_keys(tmp_path / "keys.json", KEYS)
    server = serve(repository(tmp_path), "--frontends", "2", "--api-keys", str(keys))
    x = caller_rows(5, 1)
    for _ in range(8):  # new connections, spread over both front ends
        client = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
        said = parameters(client.infer("add_one", inputs(x, grpcclient), headers=bearer("key-of-b")))
        assert said["onnxserve_tenant"] == "team-b"
        try:
            client.infer("add_one", inputs(x, grpcclient))
        except grpcclient.InferenceServerException as err:
            assert err.status() == "StatusCode.UNAUTHENTICATED"
        else:
            raise AssertionError("a call without a key was answered")
        client.close()
    assert server.samples().get("onnxserve_tenant_requests_total", tenant="team-b", model="add_one", outcome="ok") == 8


def test_when_the_engine_dies_every_front_end_exits(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2")
    started = children(server.process.pid)
    server.process.kill()
    server.wait(10)
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in started), timeout=15)


def test_a_reload_under_load_through_the_front_ends_drops_no_request(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2", "--model-control-mode", "explicit", "--load-model", "*")

    async def callers_during_reloads():
        async def caller(number: int) -> int:
            answered = 0
            for _ in range(25):
                await grpc_caller(server.url, number)  # checks its own rows
                answered += 1
            return answered

        async def reloads() -> None:
            client = aioclient.InferenceServerClient(server.url)
            try:
                for _ in range(3):
                    await client.load_model("add_one")  # the same files: the same signature
            finally:
                await client.close()

        results = await asyncio.gather(*(caller(number) for number in range(8)), reloads())
        return sum(results[:-1])

    assert asyncio.run(callers_during_reloads()) == 8 * 25


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_each_process_says_what_it_is(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2")
    assert command_line(server.process.pid) == "onnxserve: engine"
    titles = sorted(command_line(pid) for pid in children(server.process.pid))
    assert titles == ["onnxserve: frontend 1", "onnxserve: frontend 2"]
    lines = server.log_text().splitlines()
    assert any(" INFO engine onnxserve: ready" in line for line in lines)
    client = grpcclient.InferenceServerClient(server.url)
    assert "system_shared_memory" in client.get_server_metadata().extensions
    assert client.get_system_shared_memory_status(as_json=True) == {}
    assert any(" frontend 2 " in line for line in lines)


def test_auto_is_one_process_on_this_small_machine(tmp_path, serve):
    if cpu_cores() >= FEWEST_CORES_TO_SPLIT:
        pytest.skip(f"{cpu_cores()} cores: auto starts front ends here")
    server = serve(repository(tmp_path), "--frontends", "auto")
    assert children(server.process.pid) == [] and "onnxserve: engine" not in command_line(server.process.pid)
    client = grpcclient.InferenceServerClient(server.url)
    x = caller_rows(2, 1)
    np.testing.assert_array_equal(client.infer("add_one", inputs(x, grpcclient)).as_numpy("y"), x + 1)


def test_a_model_unloaded_and_loaded_under_load_through_other_front_ends(tmp_path, serve):
    """Callers of one model through both front ends while another is unloaded and loaded again
    over and over: the first's callers all get their own rows; the other's get their rows or a
    clean NOT_FOUND / UNAVAILABLE, never another caller's."""
    root = repository(tmp_path)
    onnx_models.write(root, "other", onnx_models.add_one(), CONFIG)
    server = serve(root, "--frontends", "2", "--model-control-mode", "explicit", "--load-model", "*")

    async def run() -> tuple[int, collections.Counter]:
        outcomes = collections.Counter()

        async def steady(number: int) -> int:
            return sum([await grpc_caller(server.url, number) is not None for _ in range(20)])

        async def churned(number: int) -> None:
            client = aioclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
            try:
                for _ in range(30):
                    x = caller_rows(number, 1)
                    try:
                        result = await client.infer("other", inputs(x))
                    except InferenceServerException as err:
                        outcomes[err.status()] += 1
                        continue
                    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
                    outcomes["ok"] += 1
            finally:
                await client.close()

        async def churn() -> None:
            client = aioclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
            try:
                for _ in range(4):
                    await client.unload_model("other")
                    await asyncio.sleep(0.05)
                    await client.load_model("other")
            finally:
                await client.close()

        results = await asyncio.gather(*(steady(n) for n in range(6)), *(churned(100 + n) for n in range(4)), churn())
        return sum(results[:6]), outcomes

    answered, outcomes = asyncio.run(run())
    assert answered == 6 * 20
    assert set(outcomes) <= {"ok", "StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE"}, outcomes
    assert outcomes["ok"] > 0


def test_a_full_queue_refuses_through_every_front_end_as_in_one_process(tmp_path, serve):
    """The engine's queue bound holds for requests from all front ends: past it, callers are
    refused at once (UNAVAILABLE, "queue is full"), the rest get their own rows."""
    root = tmp_path / "repository"
    onnx_models.write(root, "slow", onnx_models.slow_add_one(), SLOW_CONFIG.format(queue=3))
    server = serve(root, "--frontends", "2")

    async def flood():
        clients = [aioclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION) for _ in range(12)]
        try:
            blocker = asyncio.create_task(clients[0].infer("slow", inputs(caller_rows(0, 1), work=BLOCKING_WORK)))
            await asyncio.sleep(0.3)
            calls = [clients[n].infer("slow", inputs(caller_rows(n, 1), work=0)) for n in range(1, 12)]
            results = await asyncio.gather(blocker, *calls, return_exceptions=True)
            frontends = {parameters(r)["onnxserve_frontend"] for r in results if not isinstance(r, Exception)}
            return results, frontends
        finally:
            for client in clients:
                await client.close()

    results, frontends = asyncio.run(flood())
    refused = [result for result in results if isinstance(result, InferenceServerException)]
    assert len(refused) == 12 - 1 - 3, "the blocker runs, three wait, the rest are refused"
    assert all(r.status() == "StatusCode.UNAVAILABLE" and "queue is full" in r.message() for r in refused)
    for caller, result in enumerate(results):
        if not isinstance(result, Exception):
            np.testing.assert_array_equal(result.as_numpy("y"), caller_rows(caller, 1) + 1)
    samples = server.samples()
    assert samples.get("onnxserve_requests_total", model="slow", version="1", outcome="rejected", protocol="grpc") == 8


def test_statistics_and_the_index_answer_the_same_through_every_front_end(tmp_path, serve):
    server = serve(repository(tmp_path), "--frontends", "2")
    client = grpcclient.InferenceServerClient(server.url)
    for caller in range(5):
        client.infer("add_one", inputs(caller_rows(caller, 1), grpcclient))
    indexes, seen = set(), set()
    for number in range(12):  # new connections, spread over both front ends
        other = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
        seen.add(parameters(other.infer("add_one", inputs(caller_rows(9, 1), grpcclient)))["onnxserve_frontend"])
        stats = other.get_inference_statistics("add_one", as_json=True)["model_stats"][0]
        assert int(stats["inference_count"]) == 5 + number + 1, "every inference, whichever front end took it"
        indexes.add(json.dumps(other.get_model_repository_index(as_json=True)["models"], sort_keys=True))
        assert other.is_server_ready() and other.is_model_ready("add_one")
        other.close()
    assert seen == {1, 2}
    assert len(indexes) == 1
