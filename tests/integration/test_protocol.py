"""The KServe v2 protocol through NVIDIA's tritonclient (sync and asyncio) and our own stubs."""

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server import protocol
from tests import onnx_models
from tests.conftest import start_server

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    rng = np.random.default_rng(len(datatype) * 7 + rows)
    if datatype == "BYTES":
        words = [f"w{i}-é".encode() for i in rng.integers(0, 1000, size=rows * 3)]
        return np.array(words, dtype=np.object_).reshape(rows, 3)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=(rows, 3)).astype(np.bool_)
    if datatype.startswith("FP"):
        return (rng.standard_normal((rows, 3)) * 100).astype(NUMPY[datatype])
    info = np.iinfo(NUMPY[datatype])
    return rng.integers(info.min, info.max, size=(rows, 3), dtype=NUMPY[datatype], endpoint=True)


def write_protocol_models(repository) -> None:
    """An identity model per datatype, and `multi` (two inputs in, two outputs out)."""
    for datatype in DATATYPES:
        onnx_models.write(repository, f"identity_{datatype.lower()}", onnx_models.identity(datatype))
    onnx_models.write(repository, "multi", onnx_models.two_in_two_out())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    write_protocol_models(repository)
    onnx_models.write(repository, "fixed", onnx_models.add_one(shape=(2, 4)))
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def infer_input(name: str, array: np.ndarray, datatype: str, module=grpcclient):
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_server_metadata(server):
    client = server.client()
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "onnxserve"
    assert "model_configuration" in metadata.extensions


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_the_server_answers_to_the_name_id_gives_it(tmp_path, serve, frontends):
    """Triton's --id: NVIDIA's simple_*_health_metadata examples check for the name 'triton'."""
    onnx_models.write(tmp_path, "simple", onnx_models.add_constant(1))
    server = serve(tmp_path, "--id", "triton", "--frontends", frontends)
    assert server.client().get_server_metadata().name == "triton"
    assert httpclient.InferenceServerClient(server.http_url).get_server_metadata()["name"] == "triton"


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips_as_raw_contents(server, datatype):
    array = sample(datatype)
    result = server.client().infer(f"identity_{datatype.lower()}", [infer_input("input", array, datatype)])
    output = result.as_numpy("output")
    assert output.dtype == array.dtype or datatype == "BYTES"
    np.testing.assert_array_equal(output, array)
    assert result.get_output("output").datatype == datatype


def typed_request(model: str, datatype: str, array: np.ndarray):
    request = protocol.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return request


def own_stub(server, method: str):
    channel = grpc.insecure_channel(server.url)
    return channel.unary_unary(
        f"/inference.GRPCInferenceService/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=protocol.response_class(method).FromString,
    )


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
def test_every_datatype_round_trips_as_typed_contents(server, datatype):
    array = sample(datatype)
    response = own_stub(server, "ModelInfer")(typed_request(f"identity_{datatype.lower()}", datatype, array))
    output = response.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("output", datatype, [2, 3])
    if datatype == "BYTES":
        result = grpcclient.InferResult(_as_triton(response))
        np.testing.assert_array_equal(result.as_numpy("output"), array)
    else:
        decoded = np.frombuffer(response.raw_output_contents[0], dtype=array.dtype).reshape(array.shape)
        np.testing.assert_array_equal(decoded, array)


def _as_triton(response):
    from tritonclient.grpc import service_pb2

    return service_pb2.ModelInferResponse.FromString(response.SerializeToString())


def test_output_subset_request_id_and_parameters(server):
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    b = np.array([[10, 20], [30, 40]], dtype=np.float32)
    count = np.array([[7], [8]], dtype=np.int64)
    result = server.client().infer(
        "multi",
        [infer_input("a", a, "FP32"), infer_input("b", b, "FP32"), infer_input("count", count, "INT64")],
        outputs=[grpcclient.InferRequestedOutput("difference")],
        request_id="request-42",
        parameters={"custom_key": "value", "flag": True},
    )
    response = result.get_response()
    assert response.id == "request-42"
    assert [o.name for o in response.outputs] == ["difference"]
    np.testing.assert_array_equal(result.as_numpy("difference"), a - b)
    assert result.as_numpy("sum") is None


def test_model_metadata_reports_batch_dimension(server):
    client = server.client()
    batched = client.get_model_metadata("multi")
    assert batched.platform == "onnxruntime_onnx"
    assert batched.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in batched.inputs] == [
        ("a", "FP32", [-1, 2]),
        ("b", "FP32", [-1, 2]),
        ("count", "INT64", [-1, 1]),
    ]
    fixed = client.get_model_metadata("fixed")
    assert [list(t.shape) for t in fixed.inputs] == [[2, 4]]


def test_model_config_reports_completed_config_and_provider(server):
    config = server.client().get_model_config("multi").config
    assert config.max_batch_size == 32
    assert [i.name for i in config.input] == ["a", "b", "count"]
    assert list(config.input[0].dims) == [2]
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert server.client().get_model_config("fixed").config.max_batch_size == 0
    assert server.metric("onnxserve_model_ready", model="multi", version="1", provider="CPUExecutionProvider") == 1


def test_model_ready_and_repository_index(server):
    client = server.client()
    assert client.is_model_ready("multi")
    assert client.is_model_ready("multi", "1")
    assert not client.is_model_ready("multi", "2")
    assert not client.is_model_ready("nonexistent")
    index = client.get_model_repository_index()
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("multi", "1")] == "READY"
    assert len(states) == len(DATATYPES) + 2


def test_asyncio_client(server):
    async def run():
        client = aioclient.InferenceServerClient(server.url)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert (await client.get_model_metadata("identity_fp32")).name == "identity_fp32"
            array = sample("FP32", rows=3)
            result = await client.infer("identity_fp32", [infer_input("input", array, "FP32", aioclient)])
            np.testing.assert_array_equal(result.as_numpy("output"), array)
        finally:
            await client.close()

    asyncio.run(run())


def test_health_check_and_watch(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest")
        response = next(stub.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto


def test_unimplemented_rpcs_say_so(server):
    with pytest.raises(grpc.RpcError) as error:
        own_stub(server, "LogSettings")(protocol.request_class("LogSettings")())
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "LogSettings" in error.value.details()


def test_model_control_is_refused_in_the_default_mode_naming_the_flag(server):
    for method in ("RepositoryModelLoad", "RepositoryModelUnload"):
        with pytest.raises(grpc.RpcError) as error:
            own_stub(server, method)(protocol.request_class(method)(model_name="multi"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode explicit" in error.value.details()
    assert server.client().is_model_ready("multi")  # nothing changed


def test_large_message_within_default_limit(server):
    array = np.random.default_rng(1).standard_normal((2, 3 * 1024 * 1024)).astype(np.float32)  # 24 MiB
    repository_model = "identity_fp32"
    with pytest.raises(grpcclient.InferenceServerException) as error:  # shape mismatch, but the bytes got there
        server.client().infer(repository_model, [infer_input("input", array, "FP32")])
    assert "StatusCode.INVALID_ARGUMENT" in str(error.value.status())
