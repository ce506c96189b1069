"""Decode and encode without a server."""

import struct

import numpy as np
import pytest

from server import protocol
from server.errors import InvalidInput
from server.tensors import (
    DATATYPES,
    Signature,
    TensorSpec,
    decode_request,
    deserialize_bytes,
    encode_outputs,
    serialize_bytes,
)

SIGNATURE = Signature(
    model="m",
    version="1",
    inputs=(TensorSpec("x", "FP32", (-1, 3)), TensorSpec("s", "BYTES", (-1, 2))),
    outputs=(TensorSpec("y", "FP32", (-1, 3)),),
    max_batch_size=4,
)


def request_with(x: np.ndarray, strings: list[bytes]):
    request = protocol.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.inputs.add(name="s", datatype="BYTES", shape=[x.shape[0], 2])
    request.raw_input_contents.append(x.tobytes())
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(s)) + s for s in strings))
    return request


def test_raw_decode_is_zero_copy_and_shaped():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    decoded = decode_request(request_with(x, [b"a", b"bc", b"", "é".encode()]), SIGNATURE)
    np.testing.assert_array_equal(decoded.feeds["x"], x)
    assert not decoded.feeds["x"].flags.owndata
    assert decoded.feeds["s"].tolist() == [["a", "bc"], ["", "é"]]
    assert decoded.rows == 2
    assert decoded.outputs == ("y",)


def test_inputs_disagreeing_on_batch_size():
    request = request_with(np.zeros((2, 3), np.float32), [b"a", b"b"])
    request.inputs[1].shape[:] = [1, 2]
    with pytest.raises(InvalidInput, match="disagree on the batch size"):
        decode_request(request, SIGNATURE)


def test_duplicate_input():
    request = request_with(np.zeros((1, 3), np.float32), [b"a", b"b"])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
    with pytest.raises(InvalidInput, match="'x' appears twice"):
        decode_request(request, SIGNATURE)


def test_typed_fp16_is_refused_with_advice():
    signature = Signature("m", "1", (TensorSpec("h", "FP16", (2,)),), (), 0)
    request = protocol.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype="FP16", shape=[2])
    with pytest.raises(InvalidInput, match="raw_input_contents"):
        decode_request(request, signature)


def test_typed_contents_in_the_wrong_field():
    signature = Signature("m", "1", (TensorSpec("x", "FP32", (2,)),), (), 0)
    request = protocol.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidInput, match="0 values in fp32_contents; expected 2.*int_contents"):
        decode_request(request, signature)


@pytest.mark.parametrize(
    "buffer, message",
    [
        (b"\x01\x00", "truncated"),
        (b"\x05\x00\x00\x00ab", "declares 5 bytes"),
        (b"\x01\x00\x00\x00\xff", "not valid UTF-8"),
    ],
)
def test_malformed_bytes(buffer, message):
    with pytest.raises(InvalidInput, match=message):
        deserialize_bytes(buffer, 1, "input 's'")


def test_bytes_round_trip():
    array = np.array([["a", "é"], ["", "xyz"]], dtype=object)
    assert deserialize_bytes(serialize_bytes(array), 4, "t") == ["a", "é", "", "xyz"]


def test_encode_outputs_raw_little_endian():
    response = protocol.ModelInferResponse()
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    encode_outputs(response, [(TensorSpec("y", "FP32", (-1, 3)), y)])
    assert response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == [2, 3]
    assert response.raw_output_contents[0] == y.astype("<f4").tobytes()


def test_datatype_table_sizes_match_the_protocol():
    sizes = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4}
    sizes |= {"INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}
    assert {wire: d.numpy.itemsize for wire, d in DATATYPES.items() if d.numpy is not None} == sizes


def test_typed_contents_outside_the_datatype_range_are_invalid_input():
    signature = Signature("m", "1", (TensorSpec("small", "INT8", (2,)),), (), 0)
    request = protocol.ModelInferRequest(model_name="m")
    request.inputs.add(name="small", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidInput, match=r"input 'small': int_contents holds 300, outside INT8's -128\.\.127"):
        decode_request(request, signature)
    edges = protocol.ModelInferRequest(model_name="m")
    edges.inputs.add(name="small", datatype="INT8", shape=[2]).contents.int_contents.extend([-128, 127])
    np.testing.assert_array_equal(decode_request(edges, signature).feeds["small"], np.array([-128, 127], np.int8))
