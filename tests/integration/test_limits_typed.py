"""Typed numeric contents (int64_contents, fp32_contents...) against a real server: counted on the
wire before protobuf parses them, against the shape and against --max-typed-elements."""

import time

import grpc
import numpy as np
import pytest

from server import protocol
from server.frontend.grpc_codec import _varint
from tests import onnx_models
from tests.conftest import start_server
from tests.integration.test_limits_tensors import MIB, OPTIONS, Watch, refused

INT64_CONTENTS = 3 << 3 | 2  # InferTensorContents.int64_contents, packed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    onnx_models.write(repository, "numbers", onnx_models.identity("FP32", shape=("batch", "n")))
    onnx_models.write(repository, "integers", onnx_models.identity("INT64", shape=("batch", "n")))
    running = start_server(repository)
    yield running
    assert running.stop() == 0


def channel_call(server, raw: bool = False):
    channel = grpc.insecure_channel(server.url, options=OPTIONS)
    if raw:
        return channel, channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    return channel, channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=protocol.ModelInferResponse.FromString,
    )


def typed_request(model: str, datatype: str, field: str, values, shape) -> protocol.ModelInferRequest:
    message = protocol.ModelInferRequest(model_name=model)
    getattr(message.inputs.add(name="input", datatype=datatype, shape=shape).contents, field).extend(values)
    return message


def test_one_byte_varints_past_the_shape_are_refused_before_protobuf_parses_them(server):
    """32M one-byte int64 varints declared as one element: 256 MiB in protobuf's arena, and ~1 GiB
    as Python ints, before the shape was looked at."""
    header = protocol.ModelInferRequest(model_name="integers").SerializeToString()
    payload = b"\x01" * (32 * MIB)
    contents = bytes([INT64_CONTENTS]) + _varint(len(payload)) + payload
    tensor = b"\x0a\x05input\x12\x05INT64\x1a\x02\x01\x01\x2a" + _varint(len(contents)) + contents
    data = header + b"\x2a" + _varint(len(tensor)) + tensor
    channel, call = channel_call(server, raw=True)
    with channel, Watch(server) as watch:
        started = time.monotonic()
        error = refused(call, data)
        took = time.monotonic() - started
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert "model 'integers': input 'input'" in details and "expected 1 for its shape" in details, details
    assert "int64_contents" in details, details
    # Receiving the message alone costs ~2.5 times its size (grpc's buffers and its bytes); parsing
    # it cost 600 MiB more.
    grew = f"resident memory grew {watch.growth / MIB:.0f} MiB for a {len(data) / MIB:.0f} MiB message"
    assert watch.growth < 3 * len(data) + 32 * MIB, grew
    assert took < 5, f"refused in {took:.1f} s"


def test_typed_values_past_the_flag_are_refused_naming_it(tmp_path, serve):
    onnx_models.write(tmp_path, "numbers", onnx_models.identity("FP32", shape=("batch", "n")))
    running = serve(tmp_path, "--max-typed-elements", "100")
    channel, call = channel_call(running)
    with channel:
        ok = call(typed_request("numbers", "FP32", "fp32_contents", [1.5] * 100, [1, 100]), timeout=10)
        assert ok.outputs[0].shape == [1, 100]
        small = refused(call, typed_request("numbers", "FP32", "fp32_contents", [1.5] * 101, [1, 101]))
        # past 64 KiB, where the message is walked before protobuf parses it
        big = refused(call, typed_request("numbers", "FP32", "fp32_contents", [1.5] * 20000, [1, 20000]))
    for error in (small, big):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 100 per request (--max-typed-elements)" in error.details(), error.details()
        assert "model 'numbers'" in error.details() and "input 'input'" in error.details(), error.details()


@pytest.mark.parametrize(
    "model, datatype, field, values",
    [
        ("numbers", "FP32", "fp32_contents", np.linspace(-3, 3, 30000, dtype=np.float32)),
        ("integers", "INT64", "int64_contents", np.arange(-15000, 15000, dtype=np.int64) * (1 << 40)),
        ("numbers", "FP32", "fp32_contents", np.array([0.25, -1.5, 3.0], dtype=np.float32)),
        ("integers", "INT64", "int64_contents", np.array([-(1 << 63), 0, (1 << 63) - 1], dtype=np.int64)),
    ],
)
def test_typed_numbers_are_answered_as_sent(server, model, datatype, field, values):
    channel, call = channel_call(server)
    with channel:
        answer = call(typed_request(model, datatype, field, values.tolist(), [1, len(values)]), timeout=30)
    assert answer.outputs[0].shape == [1, len(values)]
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], values.dtype), values)
