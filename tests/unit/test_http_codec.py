"""REST bodies to tensors and back, and the paths the REST API routes, without a server."""

import json

import numpy as np
import orjson
import pytest

from server.errors import InvalidInput
from server.frontend.http_codec import decode_infer, encode_infer, from_json, split_body
from server.frontend.http_service import HttpError, Route, route
from server.frontend.request_limits import RequestLimits
from server.tensors import DATATYPES, Signature, TensorSpec

SIGNATURE = Signature(
    model="m",
    version="1",
    max_batch_size=8,
    inputs=(TensorSpec("x", "FP32", (-1, 2)), TensorSpec("n", "INT8", (-1, 1))),
    outputs=(TensorSpec("y", "FP32", (-1, 2)), TensorSpec("s", "BYTES", (-1, 1))),
)


def body(header: dict, *tails: bytes) -> tuple[bytes, str | None]:
    text = json.dumps(header).encode()
    return text + b"".join(tails), (str(len(text)) if tails else None)


def test_json_and_binary_inputs_decode_to_the_same_feeds():
    x = np.array([[1.5, 2.5], [3.5, 4.5]], np.float32)
    as_json = {
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1.5, 2.5], [3.5, 4.5]]},
            {"name": "n", "shape": [2, 1], "datatype": "INT8", "data": [-128, 127]},
        ]
    }
    decoded, binary = decode_infer(split_body(*body(as_json)), SIGNATURE)
    np.testing.assert_array_equal(decoded.feeds["x"], x)
    assert decoded.feeds["n"].dtype == np.int8 and decoded.rows == 2 and binary == {"y": False, "s": False}
    as_binary = {
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
            {"name": "n", "shape": [2, 1], "datatype": "INT8", "parameters": {"binary_data_size": 2}},
        ],
        "outputs": [{"name": "s"}],
        "parameters": {"binary_data_output": True},
    }
    decoded, binary = decode_infer(
        split_body(*body(as_binary, x.tobytes(), np.array([-128, 127], np.int8).tobytes())), SIGNATURE
    )
    np.testing.assert_array_equal(decoded.feeds["x"], x)
    assert decoded.outputs == ("s",) and binary == {"s": True}


@pytest.mark.parametrize(
    "datatype, data, shape, fragment",
    [
        ("INT8", [1, 300], (2,), "holds 300, outside INT8's -128..127"),
        ("UINT8", [-1, 2], (2,), "holds -1, outside UINT8's 0..255"),
        ("INT32", [1.5, 2], (2,), "INT32 data must be integers"),
        ("BOOL", [1, 0], (2,), "BOOL data must be true or false"),
        ("FP32", ["1", 2], (2,), "FP32 data must be numbers"),
        ("BYTES", ["a", 1], (2,), "BYTES data must be strings"),
        ("FP32", [[1, 2], 3], (2,), "nested deeper than shape [2]"),
        ("FP32", [[], [1, 2, 3, 4]], (1, 4), "nesting of 'data' does not follow shape [1, 4]"),
        ("FP32", [[[1]]], (1, 1), "nested deeper than shape [1, 1]"),
        ("FP32", [1, 2, 3], (2, 2), "data holds 3 values; shape [2, 2] needs 4"),
        ("FP32", 5, (1,), "'data' must be a list"),
        ("FP16", [1.0, 70000], (2,), "holds 70000, outside FP16's range of ±65504"),  # else inf, silently
        ("FP32", [1e39, 2], (2,), "holds 1e+39, outside FP32's range"),
        ("FP32", [], (0, 2**62, 2**62), "declares more than 1099511627776 elements"),  # else numpy's 500
    ],
)
def test_json_data_that_would_change_silently_is_refused(datatype, data, shape, fragment):
    with pytest.raises(InvalidInput) as error:
        from_json(data, DATATYPES[datatype], shape, "model 'm' version 1: input 'x'")
    assert fragment in str(error.value)


def test_uint64_and_int64_extremes_survive_json():
    big = from_json([2**64 - 1, 0], DATATYPES["UINT64"], (2,), "w")
    small = from_json([-(2**63), 2**63 - 1], DATATYPES["INT64"], (2,), "w")
    assert big.tolist() == [2**64 - 1, 0] and small.tolist() == [-(2**63), 2**63 - 1]


@pytest.mark.parametrize(
    "text, length, fragment",
    [
        (b'{"inputs": [', None, "malformed"),
        (b"[1, 2]", None, "must be an object"),
        (b"{}", "12", "12 bytes, but the body has 2"),
        (b"{}", "two", "is not a number of bytes"),
        (b"{}", "+2", "is not a number of bytes"),
        (b"{}", "1_0", "is not a number of bytes"),
    ],
)
def test_bodies_that_cannot_be_split_say_why(text, length, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        split_body(text, length)


def test_responses_put_binary_outputs_after_the_json_header():
    y, s = np.array([[1, 2]], np.float32), np.array([["é"]], dtype=object)
    outputs = [(SIGNATURE.outputs[0], y, True), (SIGNATURE.outputs[1], s, False)]
    encoded = encode_infer("m", "1", "r1", outputs, {"onnxserve_batch_rows": 1})
    header = orjson.loads(encoded.body[: encoded.header_length])
    assert header["id"] == "r1" and header["parameters"] == {"onnxserve_batch_rows": 1}
    assert header["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 8},
    }
    assert header["outputs"][1]["data"] == ["é"]
    assert encoded.body[encoded.header_length :] == y.tobytes()
    plain = encode_infer("m", "1", None, outputs[1:], {})
    assert plain.header_length is None and "id" not in orjson.loads(plain.body)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/v2", Route("server")),
        ("/v2/health/ready", Route("ready")),
        ("/v2/models/m", Route("metadata", "m")),
        ("/v2/models/m/versions/3", Route("metadata", "m", "3")),
        ("/v2/models/m/versions/3/infer", Route("infer", "m", "3")),
        ("/v2/models/m/ready", Route("model_ready", "m")),
        ("/v2/models/stats", Route("stats")),
        ("/v2/models/m/versions/2/stats", Route("stats", "m", "2")),
        ("/v2/repository/models/m/unload", Route("unload", "m")),
        ("/v2/repository/index", Route("index")),
    ],
)
def test_paths_route_to_their_action(path, expected):
    assert route(path) == expected


@pytest.mark.parametrize(
    "path", ["/", "/v1/models/m", "/v2/models/m/versions", "/v2/models/m/infer/more", "/v2/health"]
)
def test_other_paths_are_not_found(path):
    with pytest.raises(HttpError) as error:
        route(path)
    assert error.value.status == 404


def test_deep_json_nesting_is_refused_not_recursed():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidInput, match="malformed"):
        split_body(b'{"inputs": ' + deep + b"}", None)


def test_json_with_more_values_than_allowed_is_refused_before_it_is_parsed():
    text = b'{"inputs": [{"name": "x", "data": [' + b"0," * 1000 + b"0]}]}"
    with pytest.raises(
        InvalidInput, match=r"model 'm': the request's JSON has 1001 commas.*at most 1000 \(--max-json-values\)"
    ):
        split_body(text, None, 1000, "model 'm'")
    assert split_body(text, None, 1001, "model 'm'").header["inputs"][0]["name"] == "x"


def request_with_id(request_id, **extra) -> dict:
    inputs = [
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
        {"name": "n", "shape": [1, 1], "datatype": "INT8", "data": [3]},
    ]
    return {"id": request_id, "inputs": inputs, **extra}


@pytest.mark.parametrize(
    "request_id, fragment",
    [
        ({"a": 1}, "'id' must be a string; got dict"),
        (7, "'id' must be a string; got int"),
        ("i" * 257, "'id' (257 characters) is longer than 256 bytes"),
        ("é" * 129, "'id' (129 characters) is longer than 256 bytes"),
    ],
)
def test_an_id_that_is_not_a_short_string_is_refused(request_id, fragment):
    with pytest.raises(InvalidInput) as error:
        decode_infer(split_body(*body(request_with_id(request_id))), SIGNATURE)
    assert fragment in str(error.value) and "model 'm'" in str(error.value)


def test_a_short_string_id_and_parameters_pass():
    request = split_body(*body(request_with_id("é" * 128, parameters={"priority": 1})))
    decode_infer(request, SIGNATURE)
    assert request.id == "é" * 128 and request.parameters == {"priority": 1}
    absent = split_body(*body({"inputs": request_with_id("")["inputs"]}))
    decode_infer(absent, SIGNATURE)
    assert absent.id is None


def test_parameters_are_bounded():
    parameters = {f"k{i}": i for i in range(65)}
    with pytest.raises(InvalidInput, match="'parameters' has 65 entries; at most 64"):
        decode_infer(split_body(*body(request_with_id("r", parameters=parameters))), SIGNATURE)
    with pytest.raises(InvalidInput, match="'parameters' must be an object; got list"):
        decode_infer(split_body(*body(request_with_id("r", parameters=[1]))), SIGNATURE)


def test_bytes_in_json_are_counted_against_the_limit():
    signature = Signature("m", "1", (TensorSpec("s", "BYTES", (-1, -1)),), (TensorSpec("t", "BYTES", (-1, -1)),), 8)
    header = {"inputs": [{"name": "s", "shape": [2, 3], "datatype": "BYTES", "data": ["a"] * 6}]}
    with pytest.raises(InvalidInput, match="declares 6 BYTES elements; at most 5 per request"):
        decode_infer(split_body(*body(header)), signature, RequestLimits(max_bytes_elements=5))
    decoded, _ = decode_infer(split_body(*body(header)), signature, RequestLimits(max_bytes_elements=6))
    assert decoded.feeds["s"].tolist() == [["a"] * 3] * 2


def test_long_json_tensors_convert_and_encode_across_chunks():
    values = list(range(200_000))
    decoded = from_json(values, DATATYPES["INT32"], (200_000,), "w")
    assert decoded.dtype == np.int32 and decoded.tolist() == values
    with pytest.raises(InvalidInput, match="holds 300, outside INT8's"):
        from_json([1] * 150_000 + [300], DATATYPES["INT8"], (150_001,), "w")  # in the third chunk
    texts = [f"t{i}" for i in range(150_000)]
    assert from_json(texts, DATATYPES["BYTES"], (150_000,), "w").tolist() == texts
    floats = np.arange(150_000, dtype=np.float32) / 7
    spec = TensorSpec("y", "FP32", (-1,))
    strings = (TensorSpec("s", "BYTES", (-1,)), np.array(texts, object), False)
    encoded = encode_infer("m", "1", None, [(spec, floats, False), strings], {})
    outputs = orjson.loads(encoded.body)["outputs"]
    assert np.array_equal(np.array(outputs[0]["data"], np.float32), floats) and outputs[1]["data"] == texts


def test_a_shape_of_more_dims_than_any_model_is_refused_short():
    header = {"inputs": [{"name": "x", "shape": [1] * 100_000, "datatype": "FP32", "data": [1.0]}]}
    with pytest.raises(InvalidInput, match=r"shape \[1, 1, 1, 1, 1, 1, 1, 1, \.\.\. \(100000 dims\)\] has 100000 dims"):
        decode_infer(split_body(*body(header)), SIGNATURE)
