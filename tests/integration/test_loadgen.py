"""The benchmark's load generator against a real server: it counts what it sent and reads
the server's batch size and cost from /metrics."""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from server.tools.loadgen import Run, build_request
from tests import onnx_models
from tests.conftest import ROOT, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "add_one", onnx_models.add_one(), "max_batch_size: 16\ndynamic_batching {}")
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def loadgen(server, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        server.url,
        "--model",
        "add_one",
        "--json",
        "--warmup",
        "0",
        *args,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_closed_loop_counts_requests_and_reads_server_figures(server):
    before = server.samples().get("onnxserve_requests_total", model="add_one", version="1", outcome="ok")
    metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
    result = loadgen(server, "--concurrency", "8", "--requests", "300", "--batch", "2", "--metrics-url", metrics)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["errors"]) == (300, 0)
    assert server.samples().get("onnxserve_requests_total", model="add_one", version="1", outcome="ok") - before == 300
    assert report["inferences_per_second"] == pytest.approx(2 * report["requests_per_second"])
    assert 0 < report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"]
    assert report["server_average_batch"] >= 2  # every request carries 2 rows
    assert report["server_cost_per_inference"] > 0
    assert report["client_cpu_seconds"] > 0


def test_open_loop_sends_at_the_rate_asked(server):
    result = loadgen(server, "--rate", "200", "--requests", "100")
    report = json.loads(result.stdout)
    assert (report["requests"], report["errors"]) == (100, 0)
    assert report["seconds"] == pytest.approx(0.5, abs=0.3)  # 100 requests at 200/s
    assert report["server_average_batch"] is None  # no --metrics-url: not guessed


@pytest.mark.parametrize("arrivals", ["poisson", "uniform"])
def test_open_loop_arrivals_are_poisson_or_even_at_the_rate_asked(server, arrivals):
    result = loadgen(server, "--rate", "200", "--requests", "400", "--arrivals", arrivals, "--seed", "7")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["errors"], report["arrivals"]) == (400, 0, arrivals)
    # Over 400 gaps the mean rate of a Poisson process is within about 5% of its own (1/sqrt(400)),
    # and its gaps' coefficient of variation is 1 (exponential gaps); an even schedule's is near 0,
    # what is left being the event loop's timer jitter.
    assert report["sent_per_second"] == pytest.approx(200, rel=0.25)
    if arrivals == "poisson":
        assert 0.75 < report["send_gap_cv"] < 1.3
    else:
        assert report["send_gap_cv"] < 0.4


def test_open_loop_latency_counts_from_the_scheduled_start(server):
    """A generator that falls behind (its loop blocked for 0.3 s here) must charge the wait to the
    requests it could not send on time, as a server that falls behind would make them wait."""

    async def run_blocked() -> list[float]:
        run = Run(server.url, payload, time.monotonic() + 10, 150, False)
        asyncio.get_running_loop().call_later(0.25, time.sleep, 0.3)  # blocks the loop, as a stall would
        await run.open_loop(100)
        await run.close()
        assert not run.errors
        return run.latencies

    payload = build_request(server.url, "add_one", 1, {})
    latencies = sorted(asyncio.run(run_blocked()))
    # About 30 requests fell due during the stall: the first waited about 0.3 s, the last about 0.
    assert latencies[-1] > 0.25 and latencies[-10] > 0.1


def test_errors_are_counted_and_fail_the_run(server):
    result = loadgen(server, "--requests", "5", "--shape", "x=1,5")  # the model takes 4 columns
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["errors"] == 5 and "INVALID_ARGUMENT" in report["error_samples"][0]


def test_streams_carry_the_requests_and_every_answer_is_matched(server):
    before = server.samples().get("onnxserve_requests_total", model="add_one", version="1", outcome="ok")
    result = loadgen(server, "--concurrency", "12", "--streams", "3", "--requests", "400")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "concurrency 12 over 3 streams"
    assert (report["requests"], report["errors"]) == (400, 0)
    assert server.samples().get("onnxserve_requests_total", model="add_one", version="1", outcome="ok") - before == 400
    assert 0 < report["p50_ms"] <= report["p99_ms"]


def test_stream_errors_are_counted_from_the_answers(server):
    result = loadgen(server, "--concurrency", "2", "--streams", "2", "--requests", "6", "--shape", "x=1,5")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["errors"] == 6 and "'x'" in report["error_samples"][0]


def test_streams_need_a_closed_loop_wide_enough(server):
    result = loadgen(server, "--concurrency", "2", "--streams", "3", "--requests", "6")
    assert result.returncode == 2 and "--streams" in result.stderr


def test_server_cpu_per_request_is_read_from_the_server_process(server):
    result = loadgen(server, "--concurrency", "4", "--requests", "300", "--server-pid", str(server.process.pid))
    report = json.loads(result.stdout)
    assert report["errors"] == 0
    # A gRPC call costs any Python server tens of microseconds of CPU at the least, and not seconds.
    assert 10 < report["server_cpu_per_request_us"] < 1_000_000


def test_the_echo_floor_answers_unary_calls_and_streams_in_order(tmp_path):
    model = onnx_models.write(tmp_path, "add_one", onnx_models.add_one()) / "1" / "model.onnx"
    echo = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", str(model), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = echo.stderr.readline()
        assert "echo ready on port" in line, line + echo.stderr.read()
        url = f"127.0.0.1:{line.split()[-1]}"
        base = [sys.executable, "-m", "bench.loadgen", "--url", url, "--model", "add_one", "--json", "--warmup", "0"]
        for extra in ([], ["--concurrency", "4", "--streams", "2", "--stream-protocol", "mlserver"]):
            result = subprocess.run(
                [*base, "--requests", "200", *extra], cwd=ROOT, capture_output=True, text=True, timeout=60
            )
            report = json.loads(result.stdout)
            assert (report["requests"], report["errors"]) == (200, 0), result.stderr
    finally:
        echo.terminate()
        assert echo.wait(10) == 0
        echo.stderr.close()


@pytest.mark.parametrize("body", ["binary", "json"])
def test_rest_requests_are_counted_under_the_http_protocol(server, body):
    labels = {"model": "add_one", "version": "1", "outcome": "ok", "protocol": "http"}
    before = server.samples().get("onnxserve_requests_total", **labels)
    result = loadgen(
        server, "--http-url", server.http_url, "--http-body", body, "--concurrency", "8", "--requests", "200"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["errors"]) == (200, 0) and f"REST ({body})" in report["mode"]
    assert server.samples().get("onnxserve_requests_total", **labels) - before == 200


def test_rest_errors_are_counted_with_their_status(server):
    result = loadgen(server, "--http-url", server.http_url, "--requests", "5", "--shape", "x=1,5")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["errors"] == 5
    assert report["error_samples"][0].startswith("HTTP 400") and "input 'x'" in report["error_samples"][0]


def test_shared_memory_mode_sends_no_tensor_bytes_and_leaves_no_region_behind(server):
    """--shared-memory: each caller's tensors in a region of its own, registered and then removed."""
    before = {name for name in os.listdir("/dev/shm") if name.startswith("loadgen-")}
    done = loadgen(
        server, "--concurrency", "4", "--duration", "1", "--shared-memory", "--server-pid", str(server.process.pid)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] > 10 and report["errors"] == 0 and "shared memory" in report["mode"]
    assert {name for name in os.listdir("/dev/shm") if name.startswith("loadgen-")} == before
    status = server.client().get_system_shared_memory_status(as_json=True)
    assert not status.get("regions"), "every region it registered is unregistered"
    refused = loadgen(server, "--concurrency", "4", "--shared-memory", "--streams", "2")
    assert refused.returncode == 2 and "--shared-memory is a closed loop" in refused.stderr
