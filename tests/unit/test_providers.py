"""GPU provider options as config.pbtxt gives them: checked, mapped to onnxruntime's names, TensorRT
profiles and caches; and what happens when a GPU is asked for where there is none."""

import logging
from pathlib import Path

import pytest

from server.engine.placement import CPU, CUDA, TENSORRT, GpuPolicy, plan_placements
from server.engine.providers import check_options, cuda_options, engine_cache_dir, profile_shapes, tensorrt_options
from server.errors import ConfigError
from server.models.loading import tensorrt_profiles
from server.models.model_config import load_model_settings
from server.tensors import TensorSpec
from tests import onnx_models

IMAGE = (TensorSpec("images", "FP32", (-1, 3, 224, 224)), TensorSpec("scale", "FP32", (-1, 1)))


def model_config(tmp_path: Path, text: str):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(text)
    return load_model_settings(tmp_path / "m")


def test_triton_spellings_become_onnxruntimes():
    options = cuda_options(
        1, {"cudnn_conv_algo_search": "1", "arena_extend_strategy": "0", "do_copy_in_default_stream": "true"}
    )
    assert options == {
        "device_id": "1",
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "do_copy_in_default_stream": "True",
    }
    trt = tensorrt_options(0, {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}, {}, Path("/cache"))
    # onnxruntime's Python binding takes TensorRT's switches only as True/False, never 1/0
    assert (trt["trt_fp16_enable"], trt["trt_int8_enable"], trt["trt_max_workspace_size"]) == (
        "True",
        "False",
        "1073741824",
    )
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "True"
    assert tensorrt_options(0, {"trt_dump_subgraphs": "1"}, {}, None)["trt_dump_subgraphs"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == "/cache"
    assert "trt_engine_cache_enable" not in tensorrt_options(0, {}, {}, None)


@pytest.mark.parametrize(
    "accelerator, parameters, fragment",
    [
        ("cuda", {"gpu_mem_limt": "1"}, "parameters['gpu_mem_limt']: unknown cuda option"),
        ("cuda", {"gpu_mem_limit": "lots"}, "'lots' is not a non-negative integer"),
        ("cuda", {"cudnn_conv_algo_search": "FASTEST"}, "not one of"),
        ("cuda", {"enable_cuda_graph": "yes"}, "not 0, 1, true or false"),
        ("tensorrt", {"trt_cuda_graph_enable": "1"}, "enable_cuda_graph"),
        ("tensorrt", {"precision_mode": "FP8"}, "not one of ['FP32', 'FP16', 'BF16', 'INT8']"),
        ("tensorrt", {"trt_engine_cache_enabled": "1"}, "unknown tensorrt option"),
    ],
)
def test_unknown_or_bad_options_are_refused_naming_the_field(accelerator, parameters, fragment):
    with pytest.raises(ConfigError) as error:
        check_options(accelerator, parameters, "config.pbtxt: accelerator[0]")
    assert "config.pbtxt: accelerator[0].parameters[" in str(error.value) and fragment in str(error.value)


def test_config_pbtxt_accelerators_are_checked_and_model_level_cuda_options_merged(tmp_path):
    settings = model_config(
        tmp_path,
        """
        parameters { key: "gpu_mem_limit" value { string_value: "2147483648" } }
        optimization { execution_accelerators { gpu_execution_accelerator [
          { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } },
          { name: "cuda" parameters { key: "cudnn_conv_algo_search" value: "2" } } ] } }""",
    )
    trt, cuda = settings.session.gpu_accelerators
    assert (trt.name, dict(trt.parameters)) == ("tensorrt", {"precision_mode": "FP16"})
    assert dict(cuda.parameters) == {"cudnn_conv_algo_search": "2"}
    [placement] = plan_placements(settings.session, 1, "model 'm' version 1")
    cuda_options = dict(placement.providers)[CUDA]
    assert (cuda_options["gpu_mem_limit"], cuda_options["cudnn_conv_algo_search"]) == ("2147483648", "DEFAULT")


def test_model_level_cuda_options_do_not_ask_for_a_gpu(tmp_path):
    settings = model_config(
        tmp_path,
        """instance_group [{ kind: KIND_CPU }]
        parameters { key: "gpu_mem_limit" value { string_value: "1024" } }""",
    ).session
    assert [p.device for p in plan_placements(settings, 0, "model 'm' version 1", GpuPolicy(require=True))] == ["cpu"]


def test_a_misspelt_accelerator_option_fails_the_config_naming_file_and_field(tmp_path):
    with pytest.raises(ConfigError) as error:
        model_config(
            tmp_path,
            """optimization { execution_accelerators { gpu_execution_accelerator [
          { name: "tensorrt" parameters { key: "precison_mode" value: "FP16" } } ] } }""",
        )
    assert (
        "config.pbtxt: optimization.execution_accelerators.gpu_execution_accelerator[0].parameters['precison_mode']"
        in str(error.value)
    )


def test_tensorrt_profiles_span_batch_one_to_max_batch_size():
    profiles = profile_shapes(IMAGE, 16)
    assert profiles["trt_profile_min_shapes"] == "images:1x3x224x224,scale:1x1"
    assert profiles["trt_profile_opt_shapes"] == profiles["trt_profile_max_shapes"] == "images:16x3x224x224,scale:16x1"
    assert profile_shapes(IMAGE, 0) == {}  # no batch dimension: nothing to profile
    assert profile_shapes((TensorSpec("ids", "INT64", (-1, -1)),), 8) == {}  # a variable sequence: no profile


def test_gpu_placements_list_tensorrt_then_cuda_then_cpu(tmp_path):
    settings = model_config(
        tmp_path,
        """instance_group [{ kind: KIND_GPU count: 2 gpus: [1] }]
        optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" }] } }""",
    ).session
    placements = plan_placements(
        settings, 2, "model 'm' version 1", GpuPolicy(tensorrt_profiles={"trt_profile_min_shapes": "x:1"})
    )
    assert [p.device for p in placements] == ["cuda:1", "cuda:1"]
    names = [name for name, _ in placements[0].providers]
    assert names == [TENSORRT, CUDA, CPU]
    assert (
        placements[0].providers[0][1]["trt_profile_min_shapes"] == "x:1"
        and placements[0].providers[1][1]["device_id"] == "1"
    )


def test_no_gpu_falls_back_loudly_or_fails_with_require_gpu(tmp_path, caplog):
    settings = model_config(tmp_path, "instance_group [{ kind: KIND_GPU }]").session
    with caplog.at_level(logging.WARNING):
        placements = plan_placements(settings, 0, "model 'm' version 1")
    assert [p.device for p in placements] == ["cpu"]
    assert "GPU execution is asked for, but" in caplog.text and "--require-gpu" in caplog.text
    with pytest.raises(
        ConfigError,
        match=r"model 'm' version 1: GPU execution is asked for, but .*--require-gpu makes that a load failure",
    ):
        plan_placements(settings, 0, "model 'm' version 1", GpuPolicy(require=True))


def test_profiles_come_from_the_graph_and_the_dims_the_config_fixes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_models.add_one().SerializeToString())  # x FP32 [batch, 4]
    trt = 'optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" }] } }'
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.pbtxt").write_text(trt)
    profiles = tensorrt_profiles(load_model_settings(tmp_path / "a"), path, 32)
    assert (profiles["trt_profile_min_shapes"], profiles["trt_profile_max_shapes"]) == ("x:1x4", "x:32x4")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.pbtxt").write_text("max_batch_size: 8\n" + trt)
    assert tensorrt_profiles(load_model_settings(tmp_path / "b"), path, 32)["trt_profile_opt_shapes"] == "x:8x4"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.pbtxt").write_text("")  # no tensorrt accelerator: no profiles
    assert tensorrt_profiles(load_model_settings(tmp_path / "c"), path, 32) == {}

    sequence = tmp_path / "sequence.onnx"
    sequence.write_bytes(onnx_models.identity("FP32", shape=("batch", "length")).SerializeToString())
    assert tensorrt_profiles(load_model_settings(tmp_path / "a"), sequence, 32) == {}  # a variable length
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.pbtxt").write_text(
        'max_batch_size: 4\ninput [{ name: "input" data_type: TYPE_FP32 dims: [16] }]\n' + trt
    )
    assert (
        tensorrt_profiles(load_model_settings(tmp_path / "d"), sequence, 32)["trt_profile_max_shapes"] == "input:4x16"
    )


def test_engine_caches_are_kept_apart_by_model_contents_runtime_and_gpu(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_models.add_constant(1).SerializeToString())
    first = engine_cache_dir(tmp_path / "cache", model, "NVIDIA H200", "1.31.1")
    assert first.is_dir() and first.name.startswith("model-") and first.name.endswith("-ort1.31.1-NVIDIA-H200")
    assert engine_cache_dir(tmp_path / "cache", model, "NVIDIA H200", "1.31.1") == first  # a restart reuses it
    assert engine_cache_dir(tmp_path / "cache", model, "NVIDIA L4", "1.31.1") != first
    assert engine_cache_dir(tmp_path / "cache", model, "NVIDIA H200", "1.32.0") != first
    model.write_bytes(onnx_models.add_constant(2).SerializeToString())  # new weights, same graph
    assert engine_cache_dir(tmp_path / "cache", model, "NVIDIA H200", "1.31.1") != first


def test_cuda_graphs_with_tensorrt_in_front_are_refused_naming_why(tmp_path):
    both = (
        'optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" }, '
        '{ name: "cuda" parameters { key: "enable_cuda_graph" value: "1" } }] } }'
    )
    with pytest.raises(ConfigError, match="enable_cuda_graph needs every node on CUDA, and the tensorrt accelerator"):
        model_config(tmp_path, both)
    alone = 'optimization { execution_accelerators { gpu_execution_accelerator [{ name: "cuda" parameters { key: "enable_cuda_graph" value: "1" } }] } }'
    (tmp_path / "alone").mkdir()
    assert model_config(tmp_path / "alone", alone).session.gpu_accelerators[0].name == "cuda"
