"""The GPU paths as far as this CPU machine can run them: a model that asks for a GPU falls back
loudly, or fails with --require-gpu, in the words of onnxruntime's loader; and the IO binding run
path serves through the real server."""

import asyncio
import json
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from tests import onnx_models
from tests.conftest import ROOT
from tests.integration.test_batching import caller_rows, inputs, with_client
from tests.integration.test_metrics import infer_many
from tests.integration.test_model_control import answer, index

ON_GPU = """
instance_group [{ kind: KIND_GPU }]
optimization { execution_accelerators { gpu_execution_accelerator [{ name: "cuda" parameters { key: "cudnn_conv_algo_search" value: "1" } }] } }
"""


def test_without_require_gpu_it_serves_on_the_cpu_and_says_why(tmp_path, serve):
    onnx_models.write(tmp_path, "wants_gpu", onnx_models.add_constant(3), ON_GPU)
    server = serve(tmp_path)
    assert answer(server.client(), "wants_gpu") == ("1", 3.0)
    warning = next(line for line in server.log if "GPU execution is asked for" in line)
    assert "model 'wants_gpu' version 1" in warning and "--require-gpu" in warning
    assert "no NVIDIA GPU is visible" in warning or "cannot be loaded" in warning or "has no" in warning
    config = server.client().get_model_config("wants_gpu").config
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"


def test_with_require_gpu_the_load_fails_and_the_other_models_serve(tmp_path, serve):
    onnx_models.write(tmp_path, "wants_gpu", onnx_models.add_constant(3), ON_GPU)
    onnx_models.write(tmp_path, "on_cpu", onnx_models.add_constant(1))
    server = serve(tmp_path, "--require-gpu", "true", "--strict-readiness", "false")
    client = server.client()
    state, reason = index(client)[("wants_gpu", "1")]
    assert state == "UNAVAILABLE" and "--require-gpu makes that a load failure" in reason
    assert not client.is_model_ready("wants_gpu")
    assert answer(client, "on_cpu") == ("1", 1.0)
    assert np.isclose(
        server.metric("onnxserve_model_ready", model="on_cpu", version="1", provider="CPUExecutionProvider"), 1
    )


def test_the_io_binding_path_serves_concurrent_callers_their_own_rows(tmp_path, serve):
    config = 'max_batch_size: 8\nparameters { key: "io_binding" value { string_value: "1" } }'
    onnx_models.write(tmp_path, "bound", onnx_models.add_one(), config)  # infer_many checks y = x + 1 per caller
    server = serve(tmp_path)
    assert server.client().get_model_config("bound").config.parameters["io_binding"].string_value == "1"
    answers = infer_many(server.url, "bound", [1 + caller % 4 for caller in range(32)], concurrency=16)
    assert len(answers) == 32  # infer_many checked every caller's own rows: y = x + 1
    assert server.metric("onnxserve_inferences_total", model="bound", version="1") == sum(
        rows for rows, _, _ in answers
    )


def test_gpu_report_says_what_the_cuda_provider_lacks_here():
    result = subprocess.run(
        [sys.executable, "-m", "server.tools.gpu_report", str(ROOT / "models" / "mlp" / "1" / "model.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gpus_visible"] == 0 and report["cuda_session"]["providers"] == ["CPUExecutionProvider"]
    missing = report["libraries"]["CUDAExecutionProvider"]["missing"]
    assert missing and all(".so" in name for name in missing)
    assert (
        any(name in report["cuda_unavailable_because"] for name in missing)
        or "no NVIDIA GPU" in report["cuda_unavailable_because"]
    )
    assert "libnvinfer.so.10" in report["libraries"]["TensorrtExecutionProvider"]["missing"]


def test_the_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path):
    """The GPU check's `--cpu --quick`, as CI runs it, in a process where what the lent GPU machine
    lacks (tritonclient) and what only servers use (REST) cannot be imported: every step ends with a
    status; a step that raises and one that hangs past its limit are failed and the next step runs;
    each table row names the server's provider and raw onnxruntime's; and the files are rewritten
    after every step, so that a run cut off keeps what it had done."""

    def check(out, *flags):
        code = (
            "import sys; [sys.modules.__setitem__(m, None) for m in ('tritonclient', 'uvicorn', 'orjson', 'httptools')]; "
            "from bench import gpu_check; sys.exit(gpu_check.main(sys.argv[1:]))"
        )
        command = [sys.executable, "-c", code, "--cpu", "--quick", "--out", str(out), *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)

    result = check(tmp_path / "run", "--fail-step", "energy=hang", "--fail-step", "tensorrt")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "gpu-check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert {name: step["status"] for name, step in steps.items()} == {
        "environment": "ok",
        "providers": "ok",
        "io_binding": "ok",
        "serving": "ok",
        "energy": "failed",
        "cuda_graphs": "ok",
        "cuda_shm": "skipped",
        "sequence_state": "ok",
        "frontends": "ok",
        "tensorrt": "failed",
    }
    assert "limit of 2 s" in steps["energy"]["error"] and "--fail-step" in steps["tensorrt"]["error"]
    started = [step["started_seconds"] for step in report["steps"]]
    assert started == sorted(started) and all(
        step["ended_seconds"] >= step["started_seconds"] for step in report["steps"]
    )
    assert report["writes"] == 1 + 2 * len(steps)  # once at the start, then as each step starts and ends
    assert steps["environment"]["result"]["gpu_report"]["gpus_visible"] == 0
    for served in steps["providers"]["result"]["models"].values():  # what the server opened, in its own words
        assert (
            served["provider_options"] == [["CPUExecutionProvider", {}]] and served["provider_options_from"] == "server"
        )
    assert steps["io_binding"]["result"]["outputs_equal_session_run"] is True
    sequences = steps["sequence_state"]["result"]  # the state on the CPU's device, through IO binding
    assert sequences["wrong"] == [] and sequences["kept_on_device"] is True and sequences["largest_batch"] >= 1
    refused = steps["cuda_shm"]["reason"]  # no GPU: the server says why it cannot register CUDA memory
    assert "the server said: unable to register CUDA shared memory region" in refused, refused
    graphs = steps["cuda_graphs"]["result"]
    assert sorted({answer["rows"] for answer in graphs["served"]}) == [1, 3, 8, 16] and all(
        a["equal"] for a in graphs["served"]
    )
    assert graphs["in_process"]["equal"] is True and graphs["in_process"]["runs"] >= 3
    rows = steps["serving"]["result"]["rows"]
    assert [row["concurrency"] for row in rows] == [1, 16]
    assert all(
        row["errors"] == 0 and row["inferences_per_second"] > 0 and row["raw_inferences_per_second"] > 0 for row in rows
    )
    table = (tmp_path / "run" / "gpu-check.md").read_text()
    assert table in result.stdout
    for concurrency in (1, 16):  # model, the server's provider, raw onnxruntime's, concurrency
        assert f"| mlp | CPUExecutionProvider | CPUExecutionProvider | {concurrency} |" in table
    assert "| energy | failed |" in table and "| tensorrt | failed |" in table
    split = steps["frontends"]["result"]["frontend_rows"]
    assert [row["frontends"] for row in split] == [1, 2] and all(row["errors"] == 0 for row in split)
    assert split[0]["frontend_us"] == 0 and split[1]["frontend_us"] > 0 < split[1]["engine_us"]
    assert "| 2 | 1 |" in table, "the front ends' table, a row per count"

    # Past a deadline of 0 every step is out of time; a run ended after its second step keeps both.
    cut = check(tmp_path / "cut", "--deadline-minutes", "0", "--exit-after", "providers")
    assert cut.returncode == 3, cut.stderr[-3000:]
    steps = json.loads((tmp_path / "cut" / "gpu-check.json").read_text())["steps"]
    assert [step["status"] for step in steps] == ["skipped", "skipped"] + ["pending"] * 8
    assert all("out of time" in step["reason"] for step in steps[:2])
    assert "| providers | skipped |" in (tmp_path / "cut" / "gpu-check.md").read_text()


def _cuda_extra_installed() -> bool:
    try:
        metadata.version("nvidia-cublas")
    except metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs '.[test,cuda]': NVIDIA's wheels should be here")
        pytest.skip("needs the cuda extra: pip install -e '.[test,cuda]'")
    return True


def test_the_cuda_extras_libraries_all_resolve_but_the_driver():
    """pip install '.[cuda]' on a machine without a GPU: before the server's preloading, the CUDA
    provider's libraries are not found (no RUNPATH, no LD_LIBRARY_PATH); after it, every one
    resolves except libcuda.so.1, the driver's, and the preloading reported no failure."""
    assert _cuda_extra_installed()
    provider = "from server.engine.placement import CUDA, PROVIDER_LIBRARIES; library = PROVIDER_LIBRARIES[CUDA]"
    before = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{provider}; from server.tools.gpu_report import missing_libraries; "
            "print(','.join(missing_libraries(library)))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    assert "libcublasLt.so.13" in before.stdout.split(",") and "libcuda.so.1" in before.stdout
    result = subprocess.run(
        [sys.executable, "-m", "server.tools.gpu_report", str(ROOT / "models" / "mlp" / "1" / "model.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["preload"] == []
    assert report["libraries"]["CUDAExecutionProvider"]["missing"] == ["libcuda.so.1"]
    assert "libcuda.so.1" in report["cuda_unavailable_because"]


def test_a_gpu_model_says_it_lacks_the_driver_once_the_libraries_are_preloaded(tmp_path, serve):
    assert _cuda_extra_installed()
    onnx_models.write(tmp_path, "wants_gpu", onnx_models.add_constant(3), ON_GPU)
    server = serve(tmp_path)
    assert not any("CUDA libraries:" in line for line in server.log), server.log_text()
    warning = next(line for line in server.log if "GPU execution is asked for" in line)
    assert "no NVIDIA GPU is visible" in warning or "libcuda.so.1" in warning


GRAPHED = """
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 2000 }
optimization { execution_accelerators { gpu_execution_accelerator [{ name: "cuda" parameters { key: "enable_cuda_graph" value: "1" } }] } }
"""


def infer_as_tenants(url: str, model: str, calls: list[tuple[str, int]], concurrency: int = 16) -> list[dict]:
    """Concurrent callers, each (tenant, rows) with rows of its own; each answer checked (y = x + 1)
    and returned with the rows sent and what the response says of its batch and cost."""

    async def body(client):
        gate = asyncio.Semaphore(concurrency)

        async def one(caller: int, tenant: str, rows: int) -> dict:
            async with gate:
                x = caller_rows(caller, rows)
                result = await client.infer(model, inputs(x), headers={"x-tenant-id": tenant})
            np.testing.assert_array_equal(result.as_numpy("y"), x + 1)  # its own rows, and only those
            parameters = result.get_response().parameters
            return {
                "tenant": tenant,
                "rows": rows,
                "batch": parameters["onnxserve_batch_id"].int64_param,
                "batch_rows": parameters["onnxserve_batch_rows"].int64_param,
                "dollars": parameters["onnxserve_cost_dollars"].double_param,
            }

        return await asyncio.gather(*(one(caller, tenant, rows) for caller, (tenant, rows) in enumerate(calls)))

    return asyncio.run(with_client(url, body))


def test_cuda_graph_batches_run_padded_and_are_billed_by_their_real_rows(tmp_path, serve):
    onnx_models.write(tmp_path, "graphed", onnx_models.add_one(), GRAPHED)
    server = serve(tmp_path, "--trust-tenant-header", "--device-price", "cpu=36")
    log = server.log_text()
    assert "enable_cuda_graph is on, but instance(s) [0] run on CPUExecutionProvider" in log
    assert "4 padded batch size(s) [1, 2, 4, 8] warmed on each CPU instance" in log
    config = server.client().get_model_config("graphed").config
    assert (
        config.parameters["io_binding"].string_value == "1"
        and config.parameters["inline_run_below_us"].string_value == "0"
    )

    calls = [(f"team-{caller % 3}", 1 + caller % 5) for caller in range(90)]  # 1..5 rows: most batches are padded
    answers = infer_as_tenants(server.url, "graphed", calls)
    samples = server.samples()
    assert samples.get("onnxserve_inferences_total", model="graphed", version="1") == sum(rows for _, rows in calls)
    batches: dict[int, list[dict]] = {}
    for each in answers:
        batches.setdefault(each["batch"], []).append(each)
    assert any(members[0]["batch_rows"] not in (1, 2, 4, 8) for members in batches.values()), "some batch was padded"
    assert any(len(members) > 1 for members in batches.values()), "some requests shared a batch"
    for members in batches.values():  # a batch's rows are its requests' rows, and its cost follows them
        assert members[0]["batch_rows"] == sum(answer["rows"] for answer in members)
        per_row = [answer["dollars"] / answer["rows"] for answer in members]
        assert max(per_row) == pytest.approx(min(per_row), rel=1e-9)
    model_cost = samples.get("onnxserve_cost_dollars_total", model="graphed", version="1", device="cpu")
    assert model_cost > 0 and sum(answer["dollars"] for answer in answers) == pytest.approx(model_cost, rel=1e-6)
    for tenant in ("team-0", "team-1", "team-2"):
        told = sum(answer["dollars"] for answer in answers if answer["tenant"] == tenant)
        counted = samples.get(
            "onnxserve_tenant_cost_dollars_total", tenant=tenant, model="graphed", version="1", device="cpu"
        )
        assert told == pytest.approx(counted, rel=1e-6)
        rows = samples.get("onnxserve_tenant_inferences_total", tenant=tenant, model="graphed", version="1")
        assert rows == sum(count for who, count in calls if who == tenant)


def test_cudnn_is_checked_and_nvidias_folders_are_searched_where_onnxruntime_does_not_look():
    """preload_dlls() passes over a missing cuDNN in silence, and looks for NVIDIA's wheels only
    beside onnxruntime: the server checks cuDNN itself, and tries the nvidia package's own folders."""
    assert _cuda_extra_installed()
    probe = (
        "import json; from server.engine import cuda_libraries as c; before = c._check_cudnn(); "
        "after = c._preload_from_nvidia_folders(); print(json.dumps([before, after, c._check_cudnn()]))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    before, after, checked = json.loads(found.stdout)
    assert len(before) == 1 and "libcudnn.so.9" in before[0] and "cuDNN 9" in before[0]
    assert after == [] and checked == []
