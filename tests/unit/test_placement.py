"""Sessions run where they were placed, or say loudly where they run instead: onnxruntime's own
fallbacks (a TensorRT provider that cannot load, a CUDA provider skipped) are forced here, on a
machine with no GPU and no TensorRT, with real onnxruntime sessions."""

import logging

import onnxruntime as ort
import pytest

from server.engine.placement import (
    CPU,
    CUDA,
    TENSORRT,
    GpuPolicy,
    Placement,
    loadable,
    mismatches,
    open_session,
    plan_placements,
    verify,
)
from server.errors import ConfigError
from server.models.model_config import load_model_settings
from tests import onnx_models

LABEL = "model 'm' version 1"
ON_GPU_1 = """
instance_group [{ kind: KIND_GPU gpus: [1] }]
optimization { execution_accelerators { gpu_execution_accelerator [
  { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } },
  { name: "cuda" parameters [{ key: "gpu_mem_limit" value: "1073741824" }, { key: "enable_cuda_graph" value: "0" }] }
] } }
"""


@pytest.fixture
def model(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(onnx_models.add_one().SerializeToString())
    (tmp_path / "m" / "config.pbtxt").write_text(ON_GPU_1)
    settings = load_model_settings(tmp_path / "m")
    return tmp_path / "m" / "1" / "model.onnx", plan_placements(settings.session, 2, LABEL)[0]


def test_the_plan_asks_for_tensorrt_then_cuda_on_the_configured_gpu(model):
    _, placement = model
    assert placement.device == "cuda:1"
    assert [name for name, _ in placement.providers] == [TENSORRT, CUDA, CPU]


def test_tensorrt_that_cannot_load_leaves_cuda_with_our_options(model, caplog):
    _, placement = model
    with caplog.at_level(logging.WARNING):
        usable = loadable(placement, LABEL)
    cuda = dict(usable.providers)[CUDA]
    assert [name for name, _ in usable.providers] == [CUDA, CPU]
    assert (cuda["device_id"], cuda["gpu_mem_limit"], cuda["enable_cuda_graph"]) == ("1", "1073741824", "False")
    assert "TensorRT is asked for, but libonnxruntime_providers_tensorrt.so cannot be loaded" in caplog.text


def test_a_cuda_provider_skipped_by_onnxruntime_runs_on_the_cpu_billed_as_cpu(model, caplog):
    path, placement = model
    with caplog.at_level(logging.WARNING):
        session, in_use = open_session(path, ort.SessionOptions(), placement, LABEL, GpuPolicy())
    assert session.get_providers() == [CPU] and in_use == Placement("cpu", [(CPU, {})])
    assert "GPU execution is asked for, but" in caplog.text and "cannot be loaded" in caplog.text
    # onnxruntime's wrapper would otherwise retry a failed run on its own provider list, silently
    assert session._enable_fallback is False


def test_with_require_gpu_a_session_off_its_gpu_fails_the_load(model):
    path, placement = model
    with pytest.raises(ConfigError, match="--require-gpu makes that a load failure"):
        open_session(path, ort.SessionOptions(), placement, LABEL, GpuPolicy(require=True))


def test_mismatches_compare_device_memory_limit_and_graph_as_onnxruntime_echoes_them():
    asked = [(CUDA, {"device_id": "1", "gpu_mem_limit": "1073741824", "enable_cuda_graph": "True"}), (CPU, {})]
    echoed = {
        "device_id": "1",
        "gpu_mem_limit": "1073741824",
        "enable_cuda_graph": "1",
        "arena_extend_strategy": "kNextPowerOfTwo",
    }
    assert mismatches(asked, [CUDA, CPU], {CUDA: echoed, CPU: {}}) == []
    padded = [(CUDA, {"device_id": "01", "gpu_mem_limit": "01073741824", "enable_cuda_graph": "1"})]
    assert mismatches(padded, [CUDA, CPU], {CUDA: echoed, CPU: {}}) == []
    defaults = {"device_id": "0", "gpu_mem_limit": "18446744073709551615", "enable_cuda_graph": "0"}
    found = mismatches(asked, [CUDA, CPU], {CUDA: defaults, CPU: {}})
    assert found == [
        f"{CUDA} device_id is 0, asked for 1",
        f"{CUDA} gpu_mem_limit is 18446744073709551615, asked for 1073741824",
        f"{CUDA} enable_cuda_graph is 0, asked for True",
    ]
    assert mismatches([(TENSORRT, {"trt_fp16_enable": "True"}), *asked], [CUDA, CPU], {CUDA: echoed})[0] == (
        f"asked for {TENSORRT}, onnxruntime runs it on {CUDA}"
    )


class OpenedElsewhere:
    """What onnxruntime's own fallback leaves: the CUDA provider with its defaults (GPU 0)."""

    def get_providers(self):
        return [CUDA, CPU]

    def get_provider_options(self):
        return {CUDA: {"device_id": "0", "gpu_mem_limit": "18446744073709551615", "enable_cuda_graph": "0"}, CPU: {}}


def test_a_session_on_another_gpu_is_billed_where_it_runs_or_fails_with_require_gpu(caplog):
    placement = Placement("cuda:1", [(CUDA, {"device_id": "1", "gpu_mem_limit": "1073741824"}), (CPU, {})])
    with caplog.at_level(logging.ERROR):
        in_use = verify(OpenedElsewhere(), placement, placement, LABEL, GpuPolicy())
    assert in_use.device == "cuda:0" and in_use.providers == placement.providers
    assert "CUDAExecutionProvider device_id is 0, asked for 1" in caplog.text and "cuda:0 is billed" in caplog.text
    with pytest.raises(ConfigError, match="device_id is 0, asked for 1.*--require-gpu"):
        verify(OpenedElsewhere(), placement, placement, LABEL, GpuPolicy(require=True))
