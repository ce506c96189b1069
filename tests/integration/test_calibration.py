"""Settings chosen by measurement at load: the model's ModelConfig and the log say what it runs
with and which values were measured; config.pbtxt fixes any of them; a model that cannot run on
zeros still loads, with the previous defaults and a warning."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import onnx_models
from tests.conftest import start_server
from tests.integration.test_batching import caller_rows, inputs

OVERRIDES = """max_batch_size: 8
parameters { key: "intra_op_thread_count" value { string_value: "2" } }
parameters { key: "allow_spinning" value { string_value: "1" } }
parameters { key: "inline_run_below_us" value { string_value: "0" } }
parameters { key: "adaptive_queue_delay_us" value { string_value: "0" } }
"""
MEASURED = {"intra_op_thread_count", "allow_spinning", "inline_run_below_us"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "plain", onnx_models.add_one())
    onnx_models.write(repository, "fixed", onnx_models.add_one(), OVERRIDES)
    onnx_models.write(repository, "needs_a_shape", onnx_models.reshape_by_input(), "max_batch_size: 0")
    onnx_models.write(repository, "looping", onnx_models.slow_add_one())
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def parameters(server, model: str) -> dict[str, str]:
    config = server.client().get_model_config(model, as_json=True)["config"]
    return {key: value.get("string_value", "") for key, value in config["parameters"].items()}


def log_line(server, model: str) -> str:
    return next(line for line in server.log if f"model '{model}' version 1 runs with" in line)


def test_a_model_without_config_reports_what_was_measured(server):
    found = parameters(server, "plain")
    assert set(found["calibrated"].split(",")) == MEASURED
    assert int(found["intra_op_thread_count"]) >= 1
    assert found["allow_spinning"] in ("0", "1")
    assert int(found["inline_run_below_us"]) >= 0
    assert found["adaptive_queue_delay_us"] == "1000"
    line = log_line(server, "plain")
    assert f"intra_op_thread_count {found['intra_op_thread_count']} (measured)" in line
    assert f"inline_run_below_us {found['inline_run_below_us']} (measured)" in line
    assert "thread handoff" in line and "batch 8:" in line, "batch 1 and a larger batch, and the handoff, are timed"
    x = caller_rows(1, 3)
    np.testing.assert_array_equal(server.client().infer("plain", inputs(x, module=grpcclient)).as_numpy("y"), x + 1)


def test_config_pbtxt_overrides_every_choice(server):
    found = parameters(server, "fixed")
    assert found["calibrated"] == ""
    assert (found["intra_op_thread_count"], found["allow_spinning"], found["inline_run_below_us"]) == ("2", "1", "0")
    assert found["adaptive_queue_delay_us"] == "0"
    line = log_line(server, "fixed")
    assert "(measured)" not in line
    assert (
        "intra_op_thread_count 2 (configured), allow_spinning 1 (configured), inline_run_below_us 0 (configured)"
        in line
    )


def test_a_model_that_cannot_run_on_zeros_still_loads_and_serves(server):
    found = parameters(server, "needs_a_shape")
    assert found["calibrated"] == ""
    assert "calibration failed, using the previous defaults" in log_line(server, "needs_a_shape")
    assert any("needs_a_shape" in line and "WARNING" in line for line in server.log)
    x = np.arange(4, dtype=np.float32)
    feeds = [grpcclient.InferInput("x", [4], "FP32"), grpcclient.InferInput("shape", [2], "INT64")]
    feeds[0].set_data_from_numpy(x)
    feeds[1].set_data_from_numpy(np.array([2, 2], dtype=np.int64))
    result = server.client().infer("needs_a_shape", feeds).as_numpy("y")
    np.testing.assert_array_equal(result, x.reshape(2, 2))


def test_a_graph_with_a_loop_never_runs_on_the_event_loop(server):
    found = parameters(server, "looping")
    assert found["inline_run_below_us"] == "0"
    assert "inline_run_below_us" not in found["calibrated"].split(",")
    assert "intra_op_thread_count" in found["calibrated"].split(",")
    assert "inline_run_below_us 0 (the graph has Loop)" in log_line(server, "looping")
