"""The GPU paths as far as this CPU machine can run them: a model that asks for a GPU falls back
loudly, or fails with --require-gpu, in the words of onnxruntime's loader; and the IO binding run
path serves through the real server."""

import json
import subprocess
import sys

import numpy as np

from tests import onnx_models
from tests.conftest import ROOT
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
    assert np.isclose(server.metric("onnxserve_model_ready", model="on_cpu", version="1", provider="CPUExecutionProvider"), 1)


def test_the_io_binding_path_serves_concurrent_callers_their_own_rows(tmp_path, serve):
    config = 'max_batch_size: 8\nparameters { key: "io_binding" value { string_value: "1" } }'
    onnx_models.write(tmp_path, "bound", onnx_models.add_one(), config)  # infer_many checks y = x + 1 per caller
    server = serve(tmp_path)
    assert server.client().get_model_config("bound").config.parameters["io_binding"].string_value == "1"
    answers = infer_many(server.url, "bound", [1 + caller % 4 for caller in range(32)], concurrency=16)
    assert len(answers) == 32  # infer_many checked every caller's own rows: y = x + 1
    assert server.metric("onnxserve_inferences_total", model="bound", version="1") == sum(rows for rows, _, _ in answers)


def test_gpu_report_says_what_the_cuda_provider_lacks_here():
    result = subprocess.run([sys.executable, "-m", "server.gpu_report", str(ROOT / "models" / "mlp" / "1" / "model.onnx")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gpus_visible"] == 0 and report["cuda_session"]["providers"] == ["CPUExecutionProvider"]
    missing = report["libraries"]["CUDAExecutionProvider"]["missing"]
    assert missing and all(".so" in name for name in missing)
    assert any(name in report["cuda_unavailable_because"] for name in missing) or "no NVIDIA GPU" in report["cuda_unavailable_because"]
    assert "libnvinfer.so.10" in report["libraries"]["TensorrtExecutionProvider"]["missing"]


def test_the_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path):
    command = [sys.executable, "-m", "bench.gpu_check", "--cpu", "--seconds", "0.5", "--tune-minutes", "0.5", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    mlp = report["models"]["mlp"]
    assert mlp["onnxserve"]["provider"] == "CPUExecutionProvider" and mlp["onnxserve"]["io_binding"] == "1"
    assert mlp["io_binding"]["outputs_equal_session_run"] is True
    assert all(point["errors"] == 0 and point["inferences_per_second"] > 0 for point in mlp["onnxserve"]["points"].values())
    assert report["environment"]["gpus_visible"] == 0
    table = (tmp_path / "gpu-check.md").read_text()
    assert "| mlp | CPUExecutionProvider |" in table and "of raw onnxruntime's best" in table
    tune = report["tune"]  # the tune step ran as a user runs it, and its report was read
    assert tune["exit"] in (0, 1) and tune["configurations"] and all(c.startswith("cpu ") for c in tune["configurations"])
    assert "onnxserve-tune (exit" in table and (tmp_path / "tune.json").exists()
