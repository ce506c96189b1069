"""Model control as Triton users drive it: tritonclient's load_model / unload_model and
RepositoryIndex in explicit mode, config and file overrides, the restricted admin protocol,
and model_warmup."""

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.conftest import wait_until

EXPLICIT = ("--model-control-mode", "explicit")


def x_input(x: np.ndarray):
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def answer(client, model: str, rows: int = 2, version: str = ""):
    """(version that answered, its constant): the models here compute y = x + constant."""
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    result = client.infer(model, x_input(x), model_version=version)
    offsets = result.as_numpy("y") - x
    assert np.all(offsets == offsets.flat[0]), "every row of one answer comes from one model"
    return result.get_response().model_version, float(offsets.flat[0])


def index(client) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call(*args, **kwargs)
    return error.value


@pytest.fixture
def repository(tmp_path):
    onnx_models.write(tmp_path, "plus_one", onnx_models.add_constant(1), "max_batch_size: 8")
    onnx_models.write(tmp_path, "plus_ten", onnx_models.add_constant(10))
    onnx_models.write(tmp_path, "plus_hundred", onnx_models.add_constant(100))
    return tmp_path


def test_explicit_mode_loads_what_it_is_told_and_unloads_without_losing_counters(repository, serve):
    server = serve(repository, *EXPLICIT, "--load-model", "plus_one")
    client = server.client()
    assert client.is_server_ready()  # ready: every model it was told to load serves
    rows = index(client)
    assert rows[("plus_one", "1")] == ("READY", "")
    assert rows[("plus_ten", "")] == ("UNAVAILABLE", "not loaded")
    assert rows[("plus_hundred", "")] == ("UNAVAILABLE", "not loaded")
    assert answer(client, "plus_one") == ("1", 1.0)
    assert "Request for unknown model" in refused(client.get_model_metadata, "plus_ten").message()

    client.load_model("plus_ten")
    assert client.is_model_ready("plus_ten") and answer(client, "plus_ten") == ("1", 10.0)
    assert server.metric("onnxserve_model_load_duration_seconds", model="plus_ten", version="1") > 0

    client.unload_model("plus_one")
    assert not client.is_model_ready("plus_one")
    assert client.is_server_ready(), "an unloaded model does not make the server unready"
    assert index(client)[("plus_one", "1")] == ("UNAVAILABLE", "unloaded")
    error = refused(client.infer, "plus_one", x_input(np.zeros((1, 4), np.float32)))
    assert error.status() == "StatusCode.UNAVAILABLE" and "unloaded" in error.message()
    samples = server.samples()
    assert samples.get("onnxserve_model_ready", model="plus_one", version="1", provider="CPUExecutionProvider") == 0
    assert samples.get("onnxserve_requests_total", model="plus_one", version="1", outcome="ok") == 1  # kept for rate()
    assert answer(client, "plus_ten") == ("1", 10.0)  # the other model is untouched

    client.load_model("plus_one")  # and back
    assert answer(client, "plus_one") == ("1", 1.0)
    assert server.samples().get("onnxserve_requests_total", model="plus_one", version="1", outcome="ok") == 2


def test_load_with_a_json_config_replaces_config_pbtxt_for_that_load(repository, serve):
    """The steps of NVIDIA's simple_grpc_model_control.py example, with its message checks."""
    server = serve(repository, *EXPLICIT, "--load-model", "*")
    client = server.client()
    assert len(client.get_model_repository_index().models) == 3
    assert client.get_model_config("plus_one").config.max_batch_size == 8

    bad = refused(client.load_model, "plus_one", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert "failed to load" in bad.message() and "JSON" in bad.message()
    assert bad.status() == "StatusCode.INVALID_ARGUMENT"
    assert answer(client, "plus_one") == ("1", 1.0), "a failed reload leaves the old version serving"
    state, reason = index(client)[("plus_one", "1")]
    assert state == "READY" and "reload failed" in reason

    client.load_model("plus_one", config='{"max_batch_size":"16"}')
    assert client.get_model_config("plus_one").config.max_batch_size == 16
    assert index(client)[("plus_one", "1")] == ("READY", "")
    client.load_model("plus_one")  # without a config: config.pbtxt again
    assert client.get_model_config("plus_one").config.max_batch_size == 8

    client.unload_model("plus_one")
    assert not client.is_model_ready("plus_one")
    assert "failed to load" in refused(client.load_model, "wrong_model_name").message()
    assert "Request for unknown model" in refused(client.get_model_metadata, "wrong_model_name").message()
    assert client.is_server_live()


def test_files_pushed_with_a_load_serve_without_touching_the_repository(repository, serve):
    server = serve(repository, *EXPLICIT)
    client = server.client()
    model = onnx_models.add_constant(7).SerializeToString()
    config = json.dumps({"max_batch_size": 4})
    before = set(Path(tempfile.gettempdir()).glob("onnxserve-load-*"))

    client.load_model("pushed", config=config, files={"file:1/model.onnx": model})
    assert answer(client, "pushed") == ("1", 7.0)
    assert client.get_model_config("pushed").config.max_batch_size == 4
    assert not (repository / "pushed").exists(), "nothing is written into the user's repository"
    assert set(Path(tempfile.gettempdir()).glob("onnxserve-load-*")) == before, "the private copy is removed"

    cases = {
        "file:" + "A" * 256: "longer than 255 bytes",
        "file:../escape/model.onnx": "'..'",
        "file:/etc/model.onnx": "relative",
        "file:1//model.onnx": "empty parts",
    }
    for key, expected in cases.items():
        error = refused(client.load_model, "pushed", config="{}", files={key: b"a"})
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "failed to load" in error.message() and expected in error.message(), error.message()
    error = refused(client.load_model, "pushed", files={"file:1/model.onnx": model})
    assert "need a 'config'" in error.message()
    broken = refused(client.load_model, "pushed", config="{}", files={"file:1/model.onnx": b"not onnx"})
    assert "failed to load" in broken.message() and "onnxruntime cannot load" in broken.message()
    assert answer(client, "pushed") == ("1", 7.0), "the pushed model keeps serving after the failed reloads"
    assert not (Path(tempfile.gettempdir()) / "escape").exists()
    assert client.is_server_live()


def test_versions_come_and_go_with_the_policy_and_a_broken_one_changes_nothing(repository, serve):
    onnx_models.write(
        repository, "versions", onnx_models.add_constant(1), "version_policy { latest { num_versions: 1 } }"
    )
    server = serve(repository, *EXPLICIT, "--load-model", "versions")
    client = server.client()
    assert answer(client, "versions") == ("1", 1.0)

    onnx_models.write(repository, "versions", onnx_models.add_constant(2), version=2)
    client.load_model("versions")
    assert answer(client, "versions") == ("2", 2.0)
    assert index(client)[("versions", "1")] == ("UNAVAILABLE", "no longer in the version policy")
    assert not client.is_model_ready("versions", "1")

    (repository / "versions" / "3").mkdir()
    (repository / "versions" / "3" / "model.onnx").write_bytes(b"half a model")
    error = refused(client.load_model, "versions")
    assert "failed to load" in error.message() and "version 3" in error.message()
    assert answer(client, "versions") == ("2", 2.0)
    rows = index(client)
    assert rows[("versions", "2")][0] == "READY" and "reload failed" in rows[("versions", "2")][1]
    assert rows[("versions", "3")][0] == "UNAVAILABLE" and "onnxruntime cannot load" in rows[("versions", "3")][1]
    assert client.is_server_ready(), "a failed reload leaves the model, and the server, ready"

    shutil.rmtree(repository / "versions" / "3")
    client.load_model("versions", config='{"version_policy": {"all": {}}}')  # a new policy: both serve
    assert answer(client, "versions", version="1") == ("1", 1.0)
    assert answer(client, "versions", version="2") == ("2", 2.0)
    client.load_model("versions", config='{"version_policy": {"specific": {"versions": [1]}}}')
    assert answer(client, "versions") == ("1", 1.0) and not client.is_model_ready("versions", "2")


def broken_model(repository: Path, name: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "1" / "model.onnx").write_bytes(b"not a model")


def unready_server(serve, repository: Path, *flags: str):
    """A server that started with a model that failed to load: (server, client, gRPC health stub)."""
    server = serve(repository, *EXPLICIT, *flags, wait_ready=False)
    assert wait_until(lambda: any("not ready: " in line for line in server.log))
    return server, server.client(), health_pb2_grpc.HealthStub(grpc.insecure_channel(server.url))


def test_readiness_and_grpc_health_follow_a_model_that_loads_later(tmp_path, serve):
    broken_model(tmp_path, "late")
    server, client, health = unready_server(serve, tmp_path, "--load-model", "late")
    assert not client.is_server_ready()
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING

    onnx_models.write(tmp_path, "late", onnx_models.add_constant(4))
    client.load_model("late")
    assert client.is_server_ready() and answer(client, "late") == ("1", 4.0)
    assert wait_until(
        lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    )


def test_restricted_model_repository_protocol_needs_its_header(repository, serve):
    server = serve(
        repository,
        *EXPLICIT,
        "--load-model",
        "plus_one",
        "--grpc-restricted-protocol",
        "model-repository:admin-key=s3cret",
    )
    client = server.client()
    for call in (client.load_model, client.unload_model):
        error = refused(call, "plus_ten")
        assert error.status() == "StatusCode.PERMISSION_DENIED" and "admin-key" in error.message()
    wrong = refused(client.load_model, "plus_ten", headers={"admin-key": "guess"})
    assert wrong.status() == "StatusCode.PERMISSION_DENIED"
    assert refused(client.get_model_repository_index).status() == "StatusCode.PERMISSION_DENIED"
    assert answer(client, "plus_one") == ("1", 1.0), "inference is not restricted"
    assert client.is_server_ready() and client.get_model_metadata("plus_one").name == "plus_one"

    client.load_model("plus_ten", headers={"admin-key": "s3cret"})
    assert answer(client, "plus_ten") == ("1", 10.0)
    client.unload_model("plus_ten", headers={"admin-key": "s3cret"})
    assert not client.is_model_ready("plus_ten")


WARMUP_FROM_FILE = """
max_batch_size: 4
model_warmup {
  name: "a number"
  batch_size: 2
  count: 3
  inputs { key: "text" value: { data_type: TYPE_STRING dims: [1] input_data_file: "text" } }
}
"""
WARMUP_WITH_ZEROS = """
max_batch_size: 4
model_warmup {
  name: "empty strings"
  batch_size: 1
  inputs { key: "text" value: { data_type: TYPE_STRING dims: [1] zero_data: true } }
}
"""


def text_input(values: list[str]):
    tensor = grpcclient.InferInput("text", [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
    return [tensor]


def test_a_string_model_loads_without_model_warmup_and_warms_up_with_one(tmp_path, serve):
    onnx_models.write(tmp_path, "automatic", onnx_models.text_to_number())
    directory = onnx_models.write(tmp_path, "from_file", onnx_models.text_to_number(), WARMUP_FROM_FILE)
    (directory / "warmup").mkdir()
    (directory / "warmup" / "text").write_bytes(b"".join(len(s).to_bytes(4, "little") + s for s in (b"12", b"345")))
    onnx_models.write(tmp_path, "with_zeros", onnx_models.text_to_number(), WARMUP_WITH_ZEROS)
    server = serve(tmp_path, "--strict-readiness", "false")
    client = server.client()
    log = server.log_text()

    for model in ("automatic", "from_file"):
        result = client.infer(model, text_input(["12", "-7"]))
        np.testing.assert_array_equal(result.as_numpy("number"), [[12], [-7]])
    assert "automatic warm-up with zeros failed" in log and "model_warmup" in log and "stoll" in log
    assert "warm-up sample 'a number' ran 3 time(s)" in log
    assert not client.is_model_ready("with_zeros"), "an explicit warm-up that fails fails the load"
    state, reason = index(client)[("with_zeros", "1")]
    assert state == "UNAVAILABLE" and "model_warmup[0]" in reason and "empty strings" in reason


def test_warmup_samples_that_do_not_fit_the_model_name_the_field(tmp_path, serve):
    onnx_models.write(tmp_path, "plus_one", onnx_models.add_constant(1), "max_batch_size: 4")
    server = serve(tmp_path, *EXPLICIT, "--load-model", "plus_one")
    client = server.client()
    sample = {
        "name": "s",
        "batch_size": 2,
        "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "random_data": True}},
    }
    client.load_model("plus_one", config=json.dumps({"max_batch_size": 4, "model_warmup": [sample]}))
    assert "warm-up sample 's' ran 1 time(s)" in server.log_text()
    wrong = [
        ({**sample, "batch_size": 5}, "batch_size: 5 is outside 1..max_batch_size (4)"),
        ({**sample, "inputs": {"y": sample["inputs"]["x"]}}, "the model's inputs are ['x']"),
        ({**sample, "inputs": {"x": {**sample["inputs"]["x"], "data_type": "TYPE_INT32"}}}, "data_type: INT32"),
        ({**sample, "inputs": {"x": {**sample["inputs"]["x"], "dims": [5]}}}, "does not fit"),
        (
            {**sample, "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "absent"}}},
            "cannot read",
        ),
    ]
    for bad, expected in wrong:
        error = refused(client.load_model, "plus_one", config=json.dumps({"max_batch_size": 4, "model_warmup": [bad]}))
        assert "model_warmup[0]" in error.message() and expected in error.message(), error.message()
    assert answer(client, "plus_one") == ("1", 1.0)


def test_any_rpc_group_can_be_restricted_streams_included(repository, serve):
    server = serve(repository, "--grpc-restricted-protocol", "inference:token=t0ken")
    client = server.client()
    error = refused(client.infer, "plus_one", x_input(np.ones((1, 4), np.float32)))
    assert error.status() == "StatusCode.PERMISSION_DENIED" and "'token'" in error.message()
    result = client.infer("plus_one", x_input(np.ones((1, 4), np.float32)), headers={"token": "t0ken"})
    np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2, np.float32))
    assert client.is_server_ready() and client.get_model_repository_index().models  # other groups stay open

    answers = []
    client.start_stream(callback=lambda result, error: answers.append(error))  # refused as it opens
    assert wait_until(lambda: answers)
    client.stop_stream()
    assert answers[0] is not None and "PERMISSION_DENIED" in str(answers[0].status())


def test_a_load_whose_caller_gives_up_still_finishes(repository, serve):
    server = serve(repository, *EXPLICIT)
    client = server.client()
    sample = {
        "name": "long",
        "batch_size": 1,
        "count": 100000,
        "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}},
    }
    slow_to_load = json.dumps({"model_warmup": [sample]})  # a warm-up of about a second
    names = ("plus_one", "plus_ten", "plus_hundred")
    for name in names:
        with pytest.raises(InferenceServerException) as gave_up:
            client.load_model(name, config=slow_to_load, client_timeout=0.3)
        assert "Deadline" in str(gave_up.value) or "DEADLINE" in str(gave_up.value.status())
    assert all(f"load of model '{name}' requested" in server.log_text() for name in names)

    def settled() -> bool:
        return all(index(client).get((name, "1"), ("",))[0] == "READY" for name in names)

    assert wait_until(settled, timeout=60), index(client)
    assert [answer(client, name)[0] for name in names] == ["1"] * 3


def test_a_load_request_cannot_reach_files_outside_the_model(repository, serve, tmp_path_factory):
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.onnx"
    secret.write_bytes(onnx_models.add_constant(666).SerializeToString())
    server = serve(repository, *EXPLICIT)
    client = server.client()
    for filename in (str(secret), "../../elsewhere0/secret.onnx", "a\u0000b"):
        error = refused(client.load_model, "plus_one", config=json.dumps({"default_model_filename": filename}))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "default_model_filename" in error.message()
    sample = {
        "name": "s",
        "batch_size": 1,
        "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "a\u0000b"}},
    }
    error = refused(client.load_model, "plus_one", config=json.dumps({"model_warmup": [sample]}))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "input_data_file" in error.message()
    (repository / "plus_one" / "warmup").mkdir()
    (repository / "plus_one" / "warmup" / "link").symlink_to(secret)
    sample["inputs"]["x"]["input_data_file"] = "link"
    error = refused(client.load_model, "plus_one", config=json.dumps({"model_warmup": [sample]}))
    assert "leads outside" in error.message()
    clash = refused(client.load_model, "pushed", config="{}", files={"file:1": b"a", "file:1/model.onnx": b"b"})
    assert clash.status() == "StatusCode.INVALID_ARGUMENT" and "cannot be laid out" in clash.message()
    assert client.is_server_live() and not client.is_model_ready("plus_one")


def test_unloading_a_model_that_failed_at_start_makes_the_server_ready(tmp_path, serve):
    onnx_models.write(tmp_path, "good", onnx_models.add_constant(1))
    broken_model(tmp_path, "broken")
    server, client, health = unready_server(serve, tmp_path, "--load-model", "*")
    client.unload_model("broken")
    assert client.is_server_ready()
    assert wait_until(
        lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    )


def test_index_shows_loading_and_unloading_while_they_happen(repository, serve):
    onnx_models.write(repository, "slow", onnx_models.slow_add_one(), "max_batch_size: 4")
    server = serve(repository, *EXPLICIT, "--load-model", "slow")
    client = server.client()
    sample = {
        "name": "long",
        "batch_size": 1,
        "count": 100000,
        "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}},
    }
    loading = threading.Thread(
        target=client.load_model, args=("plus_one",), kwargs={"config": json.dumps({"model_warmup": [sample]})}
    )
    loading.start()
    assert wait_until(lambda: index(client).get(("plus_one", "1")) == ("LOADING", "loading"), timeout=10)
    assert not client.is_model_ready("plus_one")
    loading.join(60)
    assert index(client)[("plus_one", "1")] == ("READY", "")

    outcome = {}

    def long_request():
        x = np.ones((1, 4), np.float32)
        tensors = x_input(x)
        tensors.append(grpcclient.InferInput("work", [1, 1], "INT64"))
        tensors[1].set_data_from_numpy(np.full((1, 1), 20000, np.int64))
        outcome["y"] = client.infer("slow", tensors).as_numpy("y")

    caller = threading.Thread(target=long_request)
    caller.start()
    time.sleep(0.3)
    unloading = threading.Thread(target=client.unload_model, args=("slow",))
    unloading.start()
    assert wait_until(lambda: index(client).get(("slow", "1"), ("",))[0] == "UNLOADING", timeout=10)
    caller.join(60)
    unloading.join(60)
    np.testing.assert_array_equal(outcome["y"], np.full((1, 4), 2, np.float32))  # answered, then unloaded
    assert index(client)[("slow", "1")] == ("UNAVAILABLE", "unloaded")
