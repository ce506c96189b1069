"""Limits on what a model's configuration may ask for and on how long a load and a shutdown take,
on a real server with an honest caller beside the attack (tests/prober.py)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server import shutdown
from server.engine.batching import Batcher
from server.models.model_config import BatchingSettings
from server.models.repository import GIVE_UP_SECONDS
from server.observe.events import EventBus
from tests import onnx_models
from tests.conftest import ROOT, wait_until
from tests.prober import Prober, resident_bytes

EXPLICIT = ("--model-control-mode", "explicit")
MIB = 1 << 20


def slow_warmup(work: int, count: int) -> str:
    """config.pbtxt of tests.onnx_models.slow_add_one whose warm-up runs `work` rounds, `count` times."""
    return f"""max_batch_size: 4
model_warmup [{{ name: "slow" batch_size: 1 count: {count}
  inputs {{ key: "x" value: {{ data_type: TYPE_FP32 dims: [4] zero_data: true }} }}
  inputs {{ key: "work" value: {{ data_type: TYPE_INT64 dims: [1] input_data_file: "work" }} }} }}]
"""


def write_slow(repository, name: str, work: int, count: int) -> None:
    directory = onnx_models.write(repository, name, onnx_models.slow_add_one(), slow_warmup(work, count))
    (directory / "warmup").mkdir(exist_ok=True)
    (directory / "warmup" / "work").write_bytes(np.array([work], np.int64).tobytes())


def refused_load(client, name: str, config: str | None = None, files: dict | None = None) -> str:
    with pytest.raises(InferenceServerException) as error:
        client.load_model(name, config=config, files=files, client_timeout=30)
    return str(error.value)


def index(client) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


def test_configs_that_ask_for_unbounded_memory_or_work_are_refused_at_load(tmp_path, serve):
    onnx_models.write(tmp_path, "probe", onnx_models.add_one())
    onnx_models.write(
        tmp_path, "greedy", onnx_models.add_one(), "max_batch_size: 8 dynamic_batching { priority_levels: 1000000 }"
    )
    server = serve(tmp_path, *EXPLICIT, "--load-model", "probe")
    client = server.client()
    before = resident_bytes(server.process.pid)
    forever = {
        "max_batch_size": 8,
        "model_warmup": [
            {
                "name": "w",
                "batch_size": 1,
                "count": 2147483647,
                "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}},
            }
        ],
    }
    for number in range(1, 101):  # a hundred versions, all served: each a whole set of sessions
        (tmp_path / "versions" / str(number)).mkdir(parents=True)
    (tmp_path / "versions" / "config.pbtxt").write_text("version_policy { all {} }")
    with Prober(server.url, server.http_url, "probe") as probe:
        levels = refused_load(client, "greedy")
        started = time.monotonic()
        count = refused_load(client, "greedy", config=json.dumps(forever))
        refused_in = time.monotonic() - started
        versions = refused_load(client, "versions")
        huge = refused_load(
            client,
            "greedy",
            config=json.dumps(
                {"name": "greedy", "parameters": {f"p{i}": {"string_value": "x" * 100} for i in range(20000)}}
            ),
        )
        files = refused_load(client, "pushed", config="{}", files={f"file:1/part{i}": b"" for i in range(10001)})
    assert "config.pbtxt: dynamic_batching.priority_levels: 1000000 exceeds onnxserve's limit of 1024" in levels, levels
    assert "model_warmup[0].count: 2147483647 exceeds onnxserve's limit of 100000" in count, count
    assert refused_in < 5
    assert "version_policy all (versions chosen): 100 exceeds onnxserve's limit of 64" in versions, versions
    assert "load request parameter 'config': 2" in huge and "characters exceeds onnxserve's limit of 1048576" in huge, (
        huge
    )
    assert "'file:' parameters: 10001 exceeds onnxserve's limit of 10000" in files, files
    assert probe.worst_ms() < 300 and not probe.failures, (probe.worst_ms(), probe.failures[:3])
    assert resident_bytes(server.process.pid) - before < 50 * MIB
    state, reason = index(client)[("greedy", "")]
    assert state == "UNAVAILABLE" and "characters exceeds" in reason  # the last refusal's reason


def test_priority_levels_cost_nothing_up_front():
    """The batcher keeps a queue per level that has requests, not per level configured."""
    settings = BatchingSettings(max_batch_size=4, priority_levels=10**6)
    tracemalloc.start()
    try:
        Batcher(lambda feeds, names, instance: feeds, settings, 1, "m", "1", EventBus(), ("cpu",))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_a_load_past_its_time_limit_fails_frees_its_sessions_and_the_others_serve(tmp_path, serve):
    onnx_models.write(tmp_path, "probe", onnx_models.add_one())
    write_slow(tmp_path, "slow", work=300, count=100_000)  # the bound, at about 0.2 s a run: hours in all
    server = serve(tmp_path, *EXPLICIT, "--load-model", "probe", "--model-load-timeout-secs", "4")
    client = server.client()
    with Prober(server.url, server.http_url, "probe") as probe:
        started = time.monotonic()
        message = refused_load(client, "slow")
        failed_in = time.monotonic() - started
        assert "--model-load-timeout-secs 4" in message, message
        assert 3.5 < failed_in < 7
        state, reason = index(client)[("slow", "1")]
        assert state == "UNAVAILABLE" and "--model-load-timeout-secs 4" in reason
        # the warm-up thread stops at its next run and closes the sessions it opened
        assert wait_until(lambda: any("given-up load" in line and "stopped" in line for line in server.log), 5)

        # a load given up by an unload ends at once, however long its warm-up would run
        outcome = {}
        loading = threading.Thread(target=lambda: outcome.update(error=refused_load(client, "slow")))
        loading.start()
        assert wait_until(lambda: index(client).get(("slow", "1"), ("",))[0] == "LOADING", 10)
        started = time.monotonic()
        client.unload_model("slow", client_timeout=30)
        unloaded_in = time.monotonic() - started
        loading.join(30)
        assert unloaded_in < 2 and "unloaded" in outcome["error"], (unloaded_in, outcome)

        # and the model loads, serves and unloads as usual afterwards
        client.load_model("slow", config=json.dumps({"max_batch_size": 4}), client_timeout=30)
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), np.float32))
        work = grpcclient.InferInput("work", [1, 1], "INT64")
        work.set_data_from_numpy(np.zeros((1, 1), np.int64))
        np.testing.assert_array_equal(client.infer("slow", [x, work]).as_numpy("y"), np.ones((1, 4), np.float32))
        client.unload_model("slow", client_timeout=30)
    assert not probe.failures, probe.failures[:3]
    assert server.stop() == 0, server.log_text(last=30)


def test_sigterm_during_a_long_load_exits_within_the_exit_timeout(tmp_path, serve):
    write_slow(tmp_path, "stuck", work=10**6, count=1)  # one warm-up run of minutes: no check stops it
    server = serve(tmp_path, "--exit-timeout-secs", "2", wait_ready=False)
    assert wait_until(lambda: any("runs with" in line for line in server.log), 30)  # warm-up has begun
    time.sleep(0.5)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.wait(20)
    assert time.monotonic() - started < 2 + 3
    assert code == shutdown.ABANDONED_EXIT_CODE, server.log_text(last=20)
    assert any("still running" in line for line in server.log) and "Traceback" not in server.log_text()


def test_sigterm_with_an_unwritable_usage_log_says_how_many_records_are_lost(tmp_path, serve):
    onnx_models.write(tmp_path, "probe", onnx_models.add_one())
    server = serve(tmp_path, "--usage-log", "/dev/full")  # every write fails: ENOSPC
    client = server.client()
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), np.float32))
    for _ in range(3):
        client.infer("probe", [x])
    assert server.stop() == shutdown.USAGE_RECORDS_LOST_EXIT_CODE, server.log_text(last=20)
    assert any("3 records could not be written" in line for line in server.log), server.log_text(last=20)
    assert "Traceback" not in server.log_text()


def refused_infer(server, model: str, tensors) -> None:
    """A call the stop cuts off: the server cancels it at --exit-timeout-secs, or exits first."""
    with pytest.raises(InferenceServerException):
        server.client().infer(model, tensors)


def test_the_stop_is_bounded_with_a_batch_past_the_timeout_and_a_disk_that_does_not_answer(tmp_path, serve):
    """The worst a stop without a load under way can take: the drain uses all of --exit-timeout-secs,
    a batch then gets GIVE_UP_SECONDS to stop, and the usage log's writer is stuck in a write (a FIFO
    nobody reads, as a dead mount would hold it) through the last steps' LAST_STEPS_SECONDS."""
    onnx_models.write(tmp_path, "probe", onnx_models.add_one())
    onnx_models.write(tmp_path, "slow", onnx_models.slow_add_one(), "max_batch_size: 4")
    fifo = tmp_path / "usage.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read: the pipe fills, then write() blocks
    try:
        server = serve(tmp_path, "--usage-log", str(fifo), "--exit-timeout-secs", "2")
        client = server.client()
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), np.float32))
        for _ in range(400):  # ~400 bytes a record: past the pipe's 64 KiB
            client.infer("probe", [x])
        assert wait_until(lambda: server.metric("onnxserve_usage_log_buffer_records") > 0), "the writer is stuck"
        work = grpcclient.InferInput("work", [1, 1], "INT64")
        work.set_data_from_numpy(np.full((1, 1), 60000, np.int64))  # about 10 s: it outlives the timeout
        caller = threading.Thread(target=refused_infer, args=(server, "slow", [x, work]), daemon=True)
        caller.start()
        assert wait_until(lambda: server.metric("onnxserve_inflight_requests", model="slow", version="1") == 1)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.wait(30)
        took = time.monotonic() - started
        caller.join(10)
    finally:
        os.close(reader)
    log = server.log_text()
    assert code == shutdown.USAGE_RECORDS_LOST_EXIT_CODE, server.log_text(last=20)
    bound = 2 + GIVE_UP_SECONDS + shutdown.LAST_STEPS_SECONDS  # 4.0-4.1 s measured on 2 shared cores
    assert bound <= took < bound + 0.8, (took, server.log_text(last=20))
    assert "records are not known to be written" in log and "slow" in log, server.log_text(last=20)
    assert "Traceback" not in log


# The codec threads' pool: two jobs run past the stop (a caller gone), a third waits for a thread.
CODEC_SCRIPT = r"""
import asyncio, logging, sys, threading, time
from server import shutdown
from server.frontend.request_limits import OFFLOAD_BYTES, Offload

started = []


def decode():
    started.append(threading.current_thread().name)
    time.sleep(60)


async def main():
    offload = Offload()
    calls = [asyncio.create_task(offload.run(OFFLOAD_BYTES + 1, decode)) for _ in range(3)]
    while len(started) < 2:
        await asyncio.sleep(0.01)
    left = offload.close()
    await asyncio.sleep(0.2)
    print(f"started {len(started)}; the third call cancelled: {calls[2].cancelled()}", flush=True)
    return shutdown.exit_code(left, 0)


logging.basicConfig(level="INFO")
sys.exit(asyncio.run(main()))
"""


def test_codec_work_still_running_at_the_stop_does_not_hold_the_exit():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CODEC_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert time.monotonic() - started < 10, "the exit waited for the codec threads"
    assert result.returncode == shutdown.ABANDONED_EXIT_CODE, result.stderr[-3000:]
    assert "started 2; the third call cancelled: True" in result.stdout
    assert "left behind: codec: decode; codec: decode" in result.stderr, result.stderr[-3000:]


def test_a_queue_the_config_leaves_unbounded_is_bounded_by_the_server(tmp_path, serve):
    onnx_models.write(tmp_path, "slow", onnx_models.slow_add_one())  # no config: Triton's max_queue_size 0
    server = serve(tmp_path, "--default-max-queue-size", "2")
    client = server.client()
    assert client.get_model_config("slow").config.dynamic_batching.default_queue_policy.max_queue_size == 2

    def request(work: int):
        tensors = [grpcclient.InferInput("x", [1, 4], "FP32"), grpcclient.InferInput("work", [1, 1], "INT64")]
        tensors[0].set_data_from_numpy(np.zeros((1, 4), np.float32))
        tensors[1].set_data_from_numpy(np.full((1, 1), work, np.int64))
        return server.client().infer("slow", tensors, client_timeout=60)

    callers = [threading.Thread(target=request, args=(work,)) for work in (10000, 0, 0)]  # one runs (1.5 s), two wait
    for caller in callers:
        caller.start()
        time.sleep(0.1)
    with pytest.raises(InferenceServerException) as refused:
        request(0)
    assert "UNAVAILABLE" in refused.value.status() and "queue is full (2 requests waiting)" in str(refused.value)
    for caller in callers:
        caller.join(60)
    request(0)  # room again once the queue drained
