"""Decode and encode without a server."""

import struct
import time

import numpy as np
import orjson
import pytest

from server import protocol
from server.bytes_codec import CHUNK, bytes_from_contents, deserialize_bytes, object_array, serialize_bytes
from server.errors import InvalidInput
from server.frontend.grpc_codec import (
    _varint,
    decode_weight,
    parse_on_loop,
    parse_request,
    request_head,
    response_bytes,
)
from server.frontend.request_limits import OFFLOAD_BYTES, RequestLimits, encode_weight
from server.frontend.tensor_codec import decode_request
from server.frontend.wire_walk import MAX_FIELDS
from server.tensors import DATATYPES, Signature, TensorSpec

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
    "buffer, count, message",
    [
        (b"\x02\x00\x00\x00ab\x01\x00", 2, "element 1 has a truncated 4-byte length prefix"),
        (b"\x01\x00", 1, "element 0 has a truncated 4-byte length prefix"),
        (b"", 1 << 40, "holds 0 elements; the shape needs 1099511627776"),  # nothing sized by the shape
        (b"\x05\x00\x00\x00ab", 1, "declares 5 bytes"),
        (b"\x01\x00\x00\x00\xff", 1, "not valid UTF-8"),
    ],
)
def test_malformed_bytes(buffer, count, message):
    with pytest.raises(InvalidInput, match=message):
        deserialize_bytes(buffer, count, "input 's'")


def test_bytes_round_trip():
    array = np.array([["a", "é"], ["", "xyz"]], dtype=object)
    assert deserialize_bytes(bytes(serialize_bytes(array)), 4, "t") == ["a", "é", "", "xyz"]
    assert deserialize_bytes(memoryview(bytes(serialize_bytes(array))), 4, "t") == ["a", "é", "", "xyz"]


def test_response_outputs_are_raw_little_endian():
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = protocol.ModelInferResponse.FromString(
        response_bytes(_Model, "", [(TensorSpec("y", "FP32", (-1, 3)), y)], [])
    )
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


def test_raw_bytes_parsing_stops_one_element_past_the_shape():
    buffer = struct.pack("<I", 2) + b"ab"
    with pytest.raises(
        InvalidInput, match=r"more than 1 elements \(5999994 bytes are left after 1\); the shape needs 1"
    ):
        deserialize_bytes(buffer * 1_000_000, 1, "input 's'")  # one step, not a million
    with pytest.raises(InvalidInput, match="holds 2 elements; the shape needs 3"):
        deserialize_bytes(buffer * 2, 3, "input 's'")


def test_bytes_elements_are_counted_against_the_limit_before_any_is_parsed():
    request = request_with(np.zeros((4, 3), np.float32), [b"a"] * 7)  # 8 declared, 7 sent: never parsed
    with pytest.raises(InvalidInput, match=r"input 's': the request declares 8 BYTES elements; at most 6 per request"):
        decode_request(request, SIGNATURE, RequestLimits(max_bytes_elements=6))
    typed = protocol.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[4, 3]).contents.fp32_contents.extend([0.0] * 12)
    typed.inputs.add(name="s", datatype="BYTES", shape=[4, 2]).contents.bytes_contents.extend([b"a"] * 8)
    with pytest.raises(InvalidInput, match="declares 8 BYTES elements; at most 6"):
        decode_request(typed, SIGNATURE, RequestLimits(max_bytes_elements=6))
    assert decode_request(typed, SIGNATURE, RequestLimits(max_bytes_elements=8)).feeds["s"].shape == (4, 2)


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((0, 2**62, 2**62), "declares more than 1099511627776 elements"),  # numpy: "array is too big", a 500
        ((1,) * 100_000, "shape [1, 1, 1, 1, 1, 1, 1, 1, ... (100000 dims)] has 100000 dims"),
    ],
)
def test_shapes_no_request_can_fill_are_refused_in_few_words(shape, fragment):
    signature = Signature("m", "1", (TensorSpec("x", "FP32", (-1,) * 3),), (TensorSpec("y", "FP32", (-1,) * 3),), 0)
    request = protocol.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput) as error:
        decode_request(request, signature)
    assert fragment in str(error.value) and len(str(error.value)) < 300


def test_an_output_asked_for_twice_is_refused():
    request = request_with(np.zeros((1, 3), np.float32), [b"a", b"b"])
    for _ in range(1000):
        request.outputs.add(name="y")
    with pytest.raises(InvalidInput, match="output 'y' is requested more than once"):
        decode_request(request, SIGNATURE)


def test_an_unknown_name_is_quoted_short():
    request = request_with(np.zeros((1, 3), np.float32), [b"a", b"b"])
    request.inputs[0].name = "x" * 100_000
    with pytest.raises(InvalidInput, match=r"unknown input 'x+\.\.\. \(100000 characters\)'"):
        decode_request(request, SIGNATURE)


def padded(request):
    """`request` past OFFLOAD_BYTES, where parse_request walks the wire itself."""
    request.parameters["pad"].string_param = "p" * OFFLOAD_BYTES
    return request


def test_raw_contents_parse_as_views_of_the_wire_bytes():
    request = request_with(np.arange(6, dtype=np.float32).reshape(2, 3), [b"a", b"bc", b"", b"d"])
    request.id, request.parameters["priority"].int64_param = "r-1", 2
    data = padded(request).SerializeToString()
    message, raw = parse_request(data)
    assert [bytes(view) for view in raw] == list(request.raw_input_contents)
    assert message.id == "r-1" and not message.raw_input_contents and len(message.inputs) == 2
    decoded = decode_request(message, SIGNATURE, raw=raw)
    assert np.shares_memory(decoded.feeds["x"], np.frombuffer(data, np.uint8))  # no copy of the tensor
    assert decoded.feeds["s"].tolist() == [["a", "bc"], ["", "d"]]
    head = request_head(message, len(data), RequestLimits())
    assert (head.id, head.parameters["priority"], head.size) == ("r-1", 2, len(data))
    small, raw = parse_request(request_with(np.zeros((1, 3), np.float32), [b"a", b"b"]).SerializeToString())
    assert raw is None and len(small.raw_input_contents) == 2  # small: protobuf's own parse


@pytest.mark.parametrize("data", [b"\x3a\x05ab", b"\x0b", b"\xff" * 11, b"\x08"])
@pytest.mark.parametrize("size", ["small", "big"])
def test_a_malformed_message_is_invalid_input(data, size):
    prefix = padded(protocol.ModelInferRequest()).SerializeToString() if size == "big" else b""
    for parse in (parse_request, parse_on_loop):
        with pytest.raises(InvalidInput, match="not a valid ModelInferRequest"):
            parse(prefix + data)


def test_request_head_bounds_the_id_and_the_parameters():
    limits = RequestLimits(max_id_bytes=4, max_parameters=2)
    message = protocol.ModelInferRequest(model_name="m", id="é" * 3)  # 3 characters, 6 bytes
    with pytest.raises(InvalidInput, match=r"model 'm': 'id' \(3 characters\) is longer than 4 bytes"):
        request_head(message, 0, limits)
    message.id = "ok"
    for key in "abc":
        message.parameters[key].bool_param = True
    with pytest.raises(InvalidInput, match="'parameters' has 3 entries; at most 2"):
        request_head(message, 0, limits)


class _Model:
    name, version = "m", "1"


@pytest.mark.parametrize("stream", [False, True])
def test_response_bytes_parse_as_the_protobuf_response(stream):
    y, s = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([["a"], ["é"]], dtype=object)
    outputs = [(TensorSpec("y", "FP32", (-1, 3)), y), (TensorSpec("s", "BYTES", (-1, 1)), s)]
    data = response_bytes(_Model, "r-1", outputs, [("cost", 0.5), ("rows", 2), ("device", "cpu")], stream=stream)
    if stream:
        data = protocol.ModelStreamInferResponse.FromString(data).infer_response.SerializeToString()
    response = protocol.ModelInferResponse.FromString(data)
    expected = protocol.ModelInferResponse(model_name="m", model_version="1", id="r-1")
    expected.outputs.add(name="y", datatype="FP32", shape=[2, 3])
    expected.outputs.add(name="s", datatype="BYTES", shape=[2, 1])
    expected.raw_output_contents.extend([y.tobytes(), bytes(serialize_bytes(s))])
    expected.parameters["cost"].double_param = 0.5
    expected.parameters["rows"].int64_param = 2
    expected.parameters["device"].string_param = "cpu"
    assert response == expected


def test_the_wire_walk_refuses_what_protobuf_would_spend_memory_on():
    deep = padded(protocol.ModelInferRequest(model_name="m"))
    deep.inputs.add(name="x", datatype="FP32", shape=[1] * 65)  # packed: 65 bytes, so 7 dims at least
    assert parse_request(deep.SerializeToString())[0].inputs[0].shape == [1] * 65  # decode_request says why
    deep.inputs[0].shape.extend([1] * 600)
    with pytest.raises(InvalidInput, match="an input's shape has more than 64 dims"):
        parse_request(deep.SerializeToString())
    unpacked = b"\x2a\x82\x01" + b"\x18\x01" * 65  # inputs (130 bytes) { shape: 1 } x 65, one varint field each
    with pytest.raises(InvalidInput, match="more than 64 dims"):
        parse_request(padded(protocol.ModelInferRequest()).SerializeToString() + unpacked)
    big = padded(protocol.ModelInferRequest()).SerializeToString()
    with pytest.raises(InvalidInput, match=f"more than {MAX_FIELDS} fields"):
        parse_request(big + b"\x32\x00" * MAX_FIELDS)  # empty requested outputs
    flood = b"\x12\x00" * MAX_FIELDS  # one requested output of as many empty parameters entries
    with pytest.raises(InvalidInput, match=f"the request has more than {MAX_FIELDS} fields"):
        parse_request(big + b"\x32" + _varint(len(flood)) + flood)


@pytest.mark.parametrize("element", [b"", b"a"])
def test_typed_bytes_elements_past_the_limit_are_refused_before_protobuf_builds_them(element):
    """An empty element is 2 bytes on the wire and ~30 in protobuf's arena: they are counted first."""
    message = padded(protocol.ModelInferRequest(model_name="m"))
    message.inputs.add(name="s", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.extend([element] * 1001)
    with pytest.raises(
        InvalidInput,
        match=r"more than 1000 BYTES elements in bytes_contents; at most 1000 per request \(--max-bytes-elements\)",
    ):
        parse_request(message.SerializeToString(), max_bytes_elements=1000)
    del message.inputs[0].contents.bytes_contents[
        1:
    ]  # within the limit, the shape's count is decode_request's to check
    assert parse_request(message.SerializeToString(), max_bytes_elements=1000)[0].inputs[0].contents.bytes_contents == [
        element
    ]


def test_typed_bytes_elements_are_counted_exactly_when_their_bytes_look_like_more():
    message = padded(protocol.ModelInferRequest(model_name="m"))
    contents = message.inputs.add(name="s", datatype="BYTES", shape=[2, 2]).contents
    contents.bytes_contents.extend([b"B" * 200, b"BB", b"", b"B" * 20000])  # 0x42 is "B": 20206 of them
    contents.fp32_contents.extend([48.0] * 100)  # 0x42400000, in one packed field
    assert parse_request(message.SerializeToString(), max_bytes_elements=4)[0].inputs[0].contents == contents
    contents.bytes_contents.append(b"B")
    with pytest.raises(InvalidInput, match="more than 4 BYTES elements"):
        parse_request(message.SerializeToString(), max_bytes_elements=4)


def test_one_field_budget_for_the_whole_message_bounds_the_walk():
    """100 inputs of 200 empty parameters entries each: past the budget together, not one by one."""
    entries = b"\x22\x00" * 200  # InferInputTensor.parameters = 4
    inputs = (b"\x2a" + _varint(len(entries)) + entries) * 100
    big = padded(protocol.ModelInferRequest()).SerializeToString()
    with pytest.raises(InvalidInput, match=f"the request has more than {MAX_FIELDS} fields"):
        parse_request(big + inputs)
    entries = b"\x22\x00" * 65530  # 12.5 MiB, which the walk took 6 s of CPU to accept when each input had a budget
    started = time.process_time()
    with pytest.raises(InvalidInput, match=f"the request has more than {MAX_FIELDS} fields"):
        parse_request((b"\x2a" + _varint(len(entries)) + entries) * 100)
    assert time.process_time() - started < 1.0  # ~20 ms: MAX_FIELDS fields at ~1 us


@pytest.mark.parametrize(
    "group",
    [
        b"\x7b\x08\x01\x7c",  # field 15, a group holding a varint
        b"\x7b\x7b\x1a\x01a\x7c\x7c",  # a group in a group, one holding a string
        b"\x2b\x2c",  # a group with the number of `inputs`: protobuf keeps it unknown too
        b"\x2a\x04\x0b\x08\x01\x0c",  # a group inside an input
    ],
)
def test_groups_parse_alike_in_small_and_big_messages(group):
    small = protocol.ModelInferRequest(model_name="m")
    for message in (small, padded(protocol.ModelInferRequest(model_name="m"))):
        assert parse_request(message.SerializeToString() + group)[0] == protocol.ModelInferRequest.FromString(
            message.SerializeToString() + group
        )


@pytest.mark.parametrize("group", [b"\x7b\x6c", b"\x7b\x08\x01", b"\x7c", b"\x2a\x02\x0b\x14"])
def test_broken_groups_are_invalid_in_small_and_big_messages(group):
    for message in (protocol.ModelInferRequest(model_name="m"), padded(protocol.ModelInferRequest(model_name="m"))):
        with pytest.raises(InvalidInput, match="not a valid ModelInferRequest"):
            parse_request(message.SerializeToString() + group)


def resnet_request() -> bytes:
    """The benchmark's ResNet-50 request: one FP32 [1, 3, 224, 224] as raw contents, 602 KB."""
    request = protocol.ModelInferRequest(model_name="resnet50")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])
    request.raw_input_contents.append(np.ones((1, 3, 224, 224), np.float32).tobytes())
    request.outputs.add(name="logits")
    return request.SerializeToString()


def test_raw_numbers_decode_and_encode_on_the_loop_however_big():
    data = resnet_request()
    message, raw = parse_on_loop(data)  # not None: no codec thread for the parse
    assert len(raw[0]) == 3 * 224 * 224 * 4 and message.inputs[0].shape == [1, 3, 224, 224]
    assert decode_weight(message, raw, len(data)) == 0  # np.frombuffer on the wire bytes: nor for the decode
    assert encode_weight(np.zeros((1, 3, 224, 224), np.float32)) <= OFFLOAD_BYTES  # a 602 KB answer is one memcpy
    assert encode_weight(np.zeros((16, 3, 224, 224), np.float32)) > OFFLOAD_BYTES  # 9.6 MB: a copy longer than the hop


def test_per_element_work_leaves_the_loop():
    strings = request_with(np.zeros((4, 3), np.float32), [b"ab"] * 8)
    strings.raw_input_contents[1] = b"".join(struct.pack("<I", 2) + b"ab" for _ in range(40_000))
    strings.inputs[1].shape[:] = [4, 10_000]
    message, raw = parse_on_loop(strings.SerializeToString())  # its fields are few: the walk is cheap
    assert decode_weight(message, raw, 0) > OFFLOAD_BYTES  # 40K strings to build: a codec thread
    typed = padded(protocol.ModelInferRequest(model_name="m"))
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 20_000]).contents.fp32_contents.extend([1.0] * 20_000)
    assert parse_on_loop(typed.SerializeToString()) is None  # its typed contents are protobuf's to parse: a thread
    message, raw = parse_request(typed.SerializeToString())
    assert decode_weight(message, raw, 0) > OFFLOAD_BYTES
    many = padded(protocol.ModelInferRequest(model_name="m")).SerializeToString() + b"\x32\x00" * 300
    assert parse_on_loop(many) is None  # more top-level fields than the loop walks


def test_rest_binary_numbers_weigh_nothing_and_binary_strings_their_elements():
    from server.frontend.http_service import _binary_bytes_weight, _json_length

    header = b'{"inputs":[{"name":"input","shape":[1,3,224,224],"datatype":"FP32","parameters":{"binary_data_size":602112}}]}'
    body = header + bytes(602112)
    assert _json_length(body, str(len(header))) == len(header) and _json_length(body, None) == len(body)
    assert _json_length(body, "9" * 5000) == len(body)  # not a length split_body accepts: it says so, not this
    numbers = orjson.loads(header)
    assert len(header) + _binary_bytes_weight(numbers) <= OFFLOAD_BYTES  # decoded on the loop: a view of the body
    numbers["inputs"][0]["datatype"] = "BYTES"  # 150K elements at most: a codec thread
    assert _binary_bytes_weight(numbers) > OFFLOAD_BYTES
    assert (
        _binary_bytes_weight(
            {"inputs": ["x", {"parameters": 3}, {"datatype": "BYTES", "parameters": {"binary_data_size": "9"}}]}
        )
        == 0
    )


def test_bytes_past_one_chunk_are_whole_and_their_errors_placed():
    strings = [str(index).encode() for index in range(CHUNK + 10)]  # more than one numpy call's worth
    assert deserialize_bytes(bytes(serialize_bytes(np.array(strings, dtype=object))), len(strings), "t") == [
        s.decode() for s in strings
    ]
    assert object_array([s.decode() for s in strings], (1, len(strings)))[0, -1] == str(CHUNK + 9)
    typed = protocol.ModelInferRequest().inputs.add().contents
    typed.bytes_contents.extend(strings)
    assert bytes_from_contents(typed.bytes_contents, (len(strings),), "t")[-1] == str(CHUNK + 9)
    typed.bytes_contents[CHUNK + 5] = b"\xff"
    with pytest.raises(InvalidInput, match=f"BYTES element {CHUNK + 5} is not valid UTF-8"):
        bytes_from_contents(typed.bytes_contents, (len(strings),), "t")
