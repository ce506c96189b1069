"""The KServe v2 REST API through NVIDIA's tritonclient.http (sync and asyncio, JSON and binary
tensors), curl-like plain HTTP, and both transports at once on one model."""

import asyncio
import base64
import http.client
import json
import signal
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.conftest import start_server, wait_until
from tests.integration.test_batching import caller_rows
from tests.integration.test_protocol import DATATYPES, sample, write_protocol_models

DELAYED = "max_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: 20000 }"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    write_protocol_models(repository)
    onnx_models.write(repository, "add_one", onnx_models.add_one(), DELAYED)
    running = start_server(repository, "--http-max-body-bytes", str(1024 * 1024))
    yield running
    assert running.stop() == 0


def client(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url)


def http_input(name: str, array: np.ndarray, datatype: str, binary: bool, module=httpclient):
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def same(output: np.ndarray, array: np.ndarray, datatype: str) -> None:
    if datatype == "BYTES":  # JSON brings strings back as str, binary as bytes
        output = np.array([item.encode() if isinstance(item, str) else item for item in output.flat], dtype=object)
        array = array.reshape(-1)
    np.testing.assert_array_equal(output, array)


def request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body) of one plain HTTP call, as curl would make it."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(server, datatype, binary):
    array = sample(datatype)
    output = httpclient.InferRequestedOutput("output", binary_data=binary)
    result = client(server).infer(
        f"identity_{datatype.lower()}", [http_input("input", array, datatype, binary)], outputs=[output]
    )
    same(result.as_numpy("output"), array, datatype)
    described = result.get_output("output")
    assert described["datatype"] == datatype and described["shape"] == [2, 3]
    assert ("binary_data_size" in described.get("parameters", {})) == binary


def test_asyncio_client_every_datatype_json_and_binary_and_default_outputs(server):
    async def body():
        aio = httpaio.InferenceServerClient(server.http_url)
        try:
            assert await aio.is_server_ready()
            for datatype in DATATYPES:
                model, array = f"identity_{datatype.lower()}", sample(datatype, rows=3)
                assert await aio.is_model_ready(model)
                for binary in (True, False):
                    tensor = http_input("input", array, datatype, binary, module=httpaio)
                    output = httpaio.InferRequestedOutput("output", binary_data=binary)
                    result = await aio.infer(model, [tensor], outputs=[output], request_id=f"{datatype}-{binary}")
                    same(result.as_numpy("output"), array, datatype)
                    assert result.get_response()["id"] == f"{datatype}-{binary}"
                # no outputs named: all of them, binary (the client's default)
                result = await aio.infer(model, [http_input("input", array, datatype, True, module=httpaio)])
                same(result.as_numpy("output"), array, datatype)
        finally:
            await aio.close()

    asyncio.run(body())


def test_metadata_config_statistics_and_health(server):
    http = client(server)
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("multi") and http.is_model_ready("multi", "1")
    assert not http.is_model_ready("multi", "2") and not http.is_model_ready("nonexistent")
    metadata = http.get_server_metadata()
    assert metadata["name"] == "onnxserve" and "binary_tensor_data" in metadata["extensions"]
    model = http.get_model_metadata("multi")
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert {t["name"]: t["shape"] for t in model["inputs"]} == {"a": [-1, 2], "b": [-1, 2], "count": [-1, 1]}
    config = http.get_model_config("add_one")
    assert config["max_batch_size"] == 32 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert config["input"][0] == {
        "name": "x",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NONE",
        "dims": [4],
        "optional": False,
    }
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"

    before = http.get_inference_statistics("multi")["model_stats"][0]["inference_count"]
    a, b, count = np.ones((2, 2), np.float32), np.full((2, 2), 3, np.float32), np.array([[5], [6]], np.int64)
    inputs = [
        http_input("a", a, "FP32", True),
        http_input("b", b, "FP32", False),
        http_input("count", count, "INT64", True),
    ]
    result = http.infer("multi", inputs, outputs=[httpclient.InferRequestedOutput("difference", binary_data=False)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["difference"]
    np.testing.assert_array_equal(result.as_numpy("difference"), a - b)
    parameters = result.get_response()["parameters"]
    assert parameters["onnxserve_cost_dollars"] > 0 and parameters["onnxserve_device"] == "cpu"
    assert parameters["onnxserve_batch_rows"] >= 2 and parameters["onnxserve_compute_us"] > 0
    stats = http.get_inference_statistics("multi")["model_stats"][0]
    assert stats["inference_count"] == before + 2 and isinstance(stats["inference_stats"]["success"]["ns"], int)
    assert stats["onnxserve_cost"][0]["dollars"] > 0
    assert {row["name"] for row in http.get_model_repository_index()} >= {"multi", "add_one"}
    with pytest.raises(InferenceServerException, match="Request for unknown model"):
        http.get_model_metadata("nonexistent")


def test_curl_json_infer_and_errors_keep_the_server_serving(server):
    body = json.dumps(
        {
            "id": "c1",
            "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}],
        }
    )
    status, headers, answer = request(
        server, "POST", "/v2/models/add_one/infer", body.encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and headers["content-type"] == "application/json"
    answer = json.loads(answer)
    assert answer["id"] == "c1" and answer["outputs"][0]["data"] == list(range(2, 10))

    good = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}
    header = json.dumps(good).encode()
    raw = np.arange(4, dtype=np.float32).tobytes()
    binary = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    short_header = json.dumps(good).replace('"binary_data_size": 16', '"binary_data_size": 12').encode()
    short_binary = {**binary, "Inference-Header-Content-Length": str(len(short_header))}
    cases = [
        ("POST", "/v2/models/add_one/infer", b'{"inputs": [', {}, 400, "malformed"),
        (
            "POST",
            "/v2/models/add_one/infer",
            header + raw,
            {**binary, "Inference-Header-Content-Length": "9999"},
            400,
            "9999 bytes, but the body has",
        ),
        ("POST", "/v2/models/add_one/infer", header + raw[:12], binary, 400, "binary_data_size 16 runs past the body"),
        ("POST", "/v2/models/add_one/infer", header + raw + b"xx", binary, 400, "2 bytes of binary data follow"),
        (
            "POST",
            "/v2/models/add_one/infer",
            short_header + raw[:12],
            short_binary,
            400,
            "raw content is 12 bytes; expected 16",
        ),
        ("POST", "/v2/models/add_one/infer", b"{}" + b" " * (1024 * 1024), {}, 400, "at most 1048576"),
        (
            "POST",
            "/v2/models/add_one/infer",
            body.encode(),
            {"Content-Type": "text/xml"},
            400,
            "content type 'text/xml'",
        ),
        (
            "POST",
            "/v2/models/add_one/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}',
            {},
            400,
            "data holds 2 values; shape [1, 4] needs 4",
        ),
        (
            "POST",
            "/v2/models/add_one/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}',
            {},
            400,
            "'add_one' version 1: input 'x'",
        ),
        ("POST", "/v2/models/nonexistent/infer", body.encode(), {}, 404, "Request for unknown model"),
        ("GET", "/v2/models/add_one/stuff", b"", {}, 404, "no such path"),
        ("GET", "/v1/models", b"", {}, 404, "under /v2"),
        ("GET", "/v2/models/add_one/infer", b"", {}, 405, "use POST"),
        ("POST", "/v2/health/ready", b"", {}, 405, "use GET"),
    ]
    for method, path, payload, extra, status, fragment in cases:
        got, headers, answer = request(server, method, path, payload, extra)
        assert got == status, (path, fragment, answer)
        assert fragment in json.loads(answer)["error"], answer
    status, headers, answer = request(server, "POST", "/v2/models/add_one/infer", header + raw, binary)
    assert status == 200 and headers["content-type"] == "application/json"  # binary in, JSON out by default
    assert json.loads(answer)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert server.client().is_server_ready()


def test_grpc_and_http_callers_share_batches_and_each_get_their_own_rows(server):
    before = server.samples()
    answers: dict[int, tuple[str, int]] = {}  # caller -> (protocol, batch id)

    def call(caller: int) -> None:
        x = caller_rows(caller, 1 + caller % 3)
        if caller % 2:
            result = httpclient.InferenceServerClient(server.http_url).infer(
                "add_one", [http_input("x", x, "FP32", True)]
            )
            batch = result.get_response()["parameters"]["onnxserve_batch_id"]
        else:
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = server.client().infer("add_one", [tensor])
            batch = result.get_response().parameters["onnxserve_batch_id"].int64_param
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
        answers[caller] = ("http" if caller % 2 else "grpc", batch)

    threads = [threading.Thread(target=call, args=(caller,)) for caller in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 24
    by_batch: dict[int, set[str]] = {}
    for protocol, batch in answers.values():
        by_batch.setdefault(batch, set()).add(protocol)
    assert any(protocols == {"grpc", "http"} for protocols in by_batch.values()), by_batch
    after = server.samples()
    for protocol in ("grpc", "http"):
        counted = after.get("onnxserve_requests_total", model="add_one", version="1", outcome="ok", protocol=protocol)
        assert (
            counted
            - before.get("onnxserve_requests_total", model="add_one", version="1", outcome="ok", protocol=protocol)
            == 12
        )


def test_repository_control_and_restriction_over_http(tmp_path, serve):
    onnx_models.write(tmp_path, "plus_one", onnx_models.add_constant(1))
    server = serve(
        tmp_path, "--model-control-mode", "explicit", "--http-restricted-api", "model-repository:admin-key=s3cret"
    )
    http = client(server)
    admin = {"admin-key": "s3cret"}
    with pytest.raises(InferenceServerException, match="restricted") as refused:
        http.load_model("plus_one")
    assert refused.value.status() == "403"
    http.load_model("plus_one", headers=admin)
    assert http.is_model_ready("plus_one")
    model = onnx_models.add_constant(9).SerializeToString()
    http.load_model(
        "pushed", headers=admin, config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": model}
    )
    x = np.zeros((1, 4), np.float32)
    np.testing.assert_array_equal(http.infer("pushed", [http_input("x", x, "FP32", True)]).as_numpy("y"), x + 9)
    status, _, answer = request(
        server,
        "POST",
        "/v2/repository/models/pushed/load",
        json.dumps({"parameters": {"config": "{}", "file:1/model.onnx": "not base64!"}}).encode(),
        admin,
    )
    assert status == 400 and "not valid base64" in json.loads(answer)["error"]
    status, _, answer = request(server, "POST", "/v2/repository/models/missing/load", b"", admin)
    assert status == 404 and "failed to load" in json.loads(answer)["error"]
    http.unload_model("plus_one", headers=admin)
    assert not http.is_model_ready("plus_one")
    rows = {(row["name"], row.get("version")): row["state"] for row in http.get_model_repository_index(headers=admin)}
    assert rows[("plus_one", "1")] == "UNAVAILABLE" and rows[("pushed", "1")] == "READY"
    encoded = base64.b64encode(model).decode()
    status, _, _ = request(
        server,
        "POST",
        "/v2/repository/models/plus_one/load",
        json.dumps({"parameters": {"config": "{}", "file:1/model.onnx": encoded}}).encode(),
        admin,
    )
    assert status == 200 and http.is_model_ready("plus_one")


def test_shutdown_answers_http_requests_in_flight(tmp_path, serve):
    onnx_models.write(tmp_path, "slow", onnx_models.slow_add_one(), "max_batch_size: 4")
    server = serve(tmp_path)
    outcome = {}
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
                {"name": "work", "shape": [1, 1], "datatype": "INT64", "data": [15000]},
            ]
        }
    ).encode()

    caller = threading.Thread(
        target=lambda: outcome.update(answer=request(server, "POST", "/v2/models/slow/infer", body))
    )
    caller.start()
    assert wait_until(lambda: server.metric("onnxserve_inflight_requests", model="slow", version="1") == 1)
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: any("shutting down" in line for line in server.log))
    caller.join(60)
    status, _, answer = outcome["answer"]
    assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [2.0] * 4
    with pytest.raises(ConnectionRefusedError):  # no new requests: the port is closed
        request(server, "GET", "/v2/health/live")
    assert server.wait(30) == 0


def test_http_can_be_turned_off(tmp_path, serve):
    onnx_models.write(tmp_path, "plus_one", onnx_models.add_constant(1))
    server = serve(tmp_path, "--http-port", "-1")
    assert server.http_port == 0 and "HTTP off" in server.log_text()
    assert server.client().is_server_ready()
