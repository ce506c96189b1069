"""Start-up readiness, the model repository's rules, and graceful shutdown."""

import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import onnx_models
from tests.conftest import wait_until

SLOW = "max_batch_size: 4"


def add_one_inputs(x: np.ndarray, work: int | None = None):
    tensors = [grpcclient.InferInput("x", list(x.shape), "FP32")]
    tensors[0].set_data_from_numpy(x)
    if work is not None:
        tensors.append(grpcclient.InferInput("work", [x.shape[0], 1], "INT64"))
        tensors[1].set_data_from_numpy(np.full((x.shape[0], 1), work, np.int64))
    return tensors


def test_sigterm_answers_in_flight_refuses_new_and_exits_zero(tmp_path, serve):
    onnx_models.write(tmp_path, "slow", onnx_models.slow_add_one(), SLOW)
    server = serve(tmp_path)
    outcome = {}

    def in_flight():
        x = np.ones((1, 4), np.float32)
        outcome["result"] = server.client().infer("slow", add_one_inputs(x, work=15000)).as_numpy("y")

    caller = threading.Thread(target=in_flight)
    caller.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: any("shutting down" in line for line in server.log))
    with pytest.raises(grpcclient.InferenceServerException) as refused:
        server.client().infer("slow", add_one_inputs(np.ones((1, 4), np.float32), work=0))
    assert "UNAVAILABLE" in refused.value.status()
    caller.join(30)
    np.testing.assert_array_equal(outcome["result"], np.full((1, 4), 2, np.float32))
    assert server.wait(30) == 0
    assert "stopped" in server.log[-1]


def test_second_signal_forces_exit(tmp_path, serve):
    onnx_models.write(tmp_path, "slow", onnx_models.slow_add_one(), SLOW)
    server = serve(tmp_path, "--exit-timeout-secs", "60")
    outcome = {}

    def never_finishes():
        try:
            server.client().infer("slow", add_one_inputs(np.ones((1, 4), np.float32), work=200000))
        except grpcclient.InferenceServerException as err:
            outcome["error"] = err

    caller = threading.Thread(target=never_finishes)
    caller.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: any("shutting down" in line for line in server.log))
    server.process.send_signal(signal.SIGINT)
    assert server.wait(10) == 130
    caller.join(10)
    assert "UNAVAILABLE" in outcome["error"].status()


def test_broken_configs_fail_only_their_model(tmp_path, serve):
    onnx_models.write(tmp_path, "good", onnx_models.add_one())
    onnx_models.write(tmp_path, "syntax", onnx_models.add_one(), "max_batch_size: [oops")
    onnx_models.write(tmp_path, "unknown_field", onnx_models.add_one(), "max_batch_size: 4\nfavourite_colour: 3")
    onnx_models.write(
        tmp_path, "wrong_dims", onnx_models.add_one(), 'input [{ name: "x" data_type: TYPE_FP32 dims: [ 5 ] }]'
    )
    onnx_models.write(
        tmp_path, "wrong_type", onnx_models.add_one(), 'input [{ name: "x" data_type: TYPE_INT32 dims: [ 4 ] }]'
    )
    onnx_models.write(tmp_path, "unbatchable", onnx_models.add_one(shape=(2, 4)), "max_batch_size: 8")
    (tmp_path / "no_file" / "1").mkdir(parents=True)
    server = serve(tmp_path)
    assert not server.ready, "strict readiness: not ready while a model failed"
    client = server.client()
    assert client.is_server_live()
    assert not client.is_server_ready()
    assert client.is_model_ready("good")
    x = np.zeros((1, 4), np.float32)
    assert client.infer("good", add_one_inputs(x)).as_numpy("y").tolist() == [[1, 1, 1, 1]]
    reasons = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    expectations = {
        "syntax": ["syntax/config.pbtxt", "1:"],
        "unknown_field": ["unknown_field/config.pbtxt", "favourite_colour"],
        "wrong_dims": ["wrong_dims/config.pbtxt", "input[0].dims", "[5]", "[4]"],
        "wrong_type": ["wrong_type/config.pbtxt", "input[0].data_type", "INT32", "FP32"],
        "unbatchable": ["unbatchable/config.pbtxt", "max_batch_size", "[2, 4]"],
        "no_file": ["no_file/1/model.onnx", "not found"],
    }
    for model, fragments in expectations.items():
        state, reason = reasons[model]
        assert state == "UNAVAILABLE"
        for fragment in fragments:
            assert fragment in reason, (model, reason)
        assert not client.is_model_ready(model)
        with pytest.raises(grpcclient.InferenceServerException) as error:
            client.infer(model, add_one_inputs(x))
        assert "UNAVAILABLE" in error.value.status()


def test_lenient_readiness_serves_with_a_failed_model(tmp_path, serve):
    onnx_models.write(tmp_path, "good", onnx_models.add_one())
    onnx_models.write(tmp_path, "bad", onnx_models.add_one(), "max_batch_size: -3")
    server = serve(tmp_path, "--strict-readiness", "false")
    assert server.ready and server.client().is_server_ready()


def test_version_policy_and_version_selection(tmp_path, serve):
    for version in (1, 2, 3):
        shape = ("batch", 4) if version != 2 else ("batch", 2)
        onnx_models.write(tmp_path, "latest", onnx_models.add_one(shape=shape), version=version)
        onnx_models.write(
            tmp_path,
            "pinned",
            onnx_models.add_one(shape=shape),
            "version_policy { specific { versions: [1, 2] } }",
            version=version,
        )
    (tmp_path / "latest" / "07").mkdir()  # Triton ignores version names starting with 0
    server = serve(tmp_path)
    client = server.client()
    assert client.get_model_metadata("latest").versions == ["3"]
    assert not client.is_model_ready("latest", "1")
    with pytest.raises(grpcclient.InferenceServerException) as error:
        client.infer("latest", add_one_inputs(np.zeros((1, 4), np.float32)), model_version="1")
    assert "NOT_FOUND" in error.value.status()
    assert client.get_model_metadata("pinned").versions == ["1", "2"]
    by_version = client.infer("pinned", add_one_inputs(np.zeros((1, 2), np.float32)), model_version="2")
    assert by_version.get_response().model_version == "2"
    assert client.infer("pinned", add_one_inputs(np.zeros((1, 2), np.float32))).get_response().model_version == "2"
    assert client.infer("pinned", add_one_inputs(np.zeros((1, 4), np.float32)), model_version="1").as_numpy(
        "y"
    ).shape == (1, 4)


def test_model_without_batch_dimension_is_never_batched(tmp_path, serve):
    onnx_models.write(tmp_path, "fixed", onnx_models.add_one(shape=(2, 4)))
    server = serve(tmp_path)
    client = server.client()
    assert client.get_model_config("fixed").config.max_batch_size == 0
    threads = [
        threading.Thread(target=client.infer, args=("fixed", add_one_inputs(np.zeros((2, 4), np.float32))))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.metric("onnxserve_batches_total", model="fixed", version="1") == 8
    assert server.metric("onnxserve_inferences_total", model="fixed", version="1") == 8


def test_logs_describe_each_model(tmp_path, serve):
    onnx_models.write(tmp_path, "described", onnx_models.add_one())
    server = serve(tmp_path)
    line = next(line for line in server.log if "model 'described' version 1 loaded" in line)
    for fragment in (
        "('x', 'FP32', [-1, 4])",
        "('y', 'FP32', [-1, 4])",
        "provider CPUExecutionProvider",
        "max_batch_size 32",
    ):
        assert fragment in line
