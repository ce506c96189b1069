"""ONNX models built by the tests with onnx.helper, written into model repositories."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 9

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _io(name: str, datatype: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ONNX_TYPES[datatype], shape)


def identity(datatype: str, shape=("batch", 3)) -> onnx.ModelProto:
    """output = input, for any datatype."""
    return _model(
        [helper.make_node("Identity", ["input"], ["output"])],
        [_io("input", datatype, shape)],
        [_io("output", datatype, shape)],
    )


def add_one(shape=("batch", 4)) -> onnx.ModelProto:
    """FP32: y = x + 1, so each caller can recognise its own rows."""
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    return _model(
        [helper.make_node("Add", ["x", "one"], ["y"])], [_io("x", "FP32", shape)], [_io("y", "FP32", shape)], [one]
    )


def add_constant(value: float, shape=("batch", 4)) -> onnx.ModelProto:
    """FP32: y = x + value; versions built with different values tell which one answered."""
    constant = numpy_helper.from_array(np.array(value, dtype=np.float32), "constant")
    return _model(
        [helper.make_node("Add", ["x", "constant"], ["y"])],
        [_io("x", "FP32", shape)],
        [_io("y", "FP32", shape)],
        [constant],
    )


def text_to_number() -> onnx.ModelProto:
    """BYTES [batch, 1] -> INT64: Cast parses each string, so an empty string (a zero) fails ("stoll")."""
    return _model(
        [helper.make_node("Cast", ["text"], ["number"], to=TensorProto.INT64)],
        [_io("text", "BYTES", ["batch", 1])],
        [_io("number", "INT64", ["batch", 1])],
    )


def two_in_two_out() -> onnx.ModelProto:
    """a, b FP32 [batch, 2] -> sum, difference; and a count INT64 [batch, 1] copied through."""
    return _model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["difference"]),
            helper.make_node("Identity", ["count"], ["count_out"]),
        ],
        [_io("a", "FP32", ["batch", 2]), _io("b", "FP32", ["batch", 2]), _io("count", "INT64", ["batch", 1])],
        [
            _io("sum", "FP32", ["batch", 2]),
            _io("difference", "FP32", ["batch", 2]),
            _io("count_out", "INT64", ["batch", 1]),
        ],
    )


def simple() -> onnx.ModelProto:
    """Triton's example model `simple`: INPUT0, INPUT1 INT32 [batch, 16] -> OUTPUT0 = sum,
    OUTPUT1 = difference."""
    return _model(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        [_io("INPUT0", "INT32", ["batch", 16]), _io("INPUT1", "INT32", ["batch", 16])],
        [_io("OUTPUT0", "INT32", ["batch", 16]), _io("OUTPUT1", "INT32", ["batch", 16])],
    )


def simple_string() -> onnx.ModelProto:
    """Triton's example model `simple_string`: INPUT0, INPUT1 BYTES [batch, 16] holding numbers ->
    OUTPUT0 = their sum, OUTPUT1 = their difference, as strings."""
    nodes = [helper.make_node("Cast", [f"INPUT{i}"], [f"n{i}"], to=TensorProto.INT32) for i in (0, 1)]
    nodes += [helper.make_node("Add", ["n0", "n1"], ["sum"]), helper.make_node("Sub", ["n0", "n1"], ["difference"])]
    nodes += [
        helper.make_node("Cast", [source], [f"OUTPUT{i}"], to=TensorProto.STRING)
        for i, source in enumerate(("sum", "difference"))
    ]
    return _model(
        nodes,
        [_io("INPUT0", "BYTES", ["batch", 16]), _io("INPUT1", "BYTES", ["batch", 16])],
        [_io("OUTPUT0", "BYTES", ["batch", 16]), _io("OUTPUT1", "BYTES", ["batch", 16])],
    )


def slow_add_one(size: int = 192) -> onnx.ModelProto:
    """y = x + 1 after `max(work)` rounds of a size x size MatMul: a request chooses how long it runs.

    x FP32 [batch, 4], work INT64 [batch, 1]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), "weight")
    state0 = numpy_helper.from_array(np.ones((size, size), dtype=np.float32), "state0")
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "weight"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    nodes = [
        helper.make_node("ReduceMax", ["work"], ["rounds"], keepdims=0),
        helper.make_node("Constant", [], ["true"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
        helper.make_node("Loop", ["rounds", "true", "state0"], ["state"], body=body),
        helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["x", "one"], ["x1"]),
        helper.make_node("Add", ["x1", "nothing"], ["y"]),
    ]
    return _model(
        nodes,
        [_io("x", "FP32", ["batch", 4]), _io("work", "INT64", ["batch", 1])],
        [_io("y", "FP32", ["batch", 4])],
        [weight, state0, one, zero],
    )


def reshape_by_input() -> onnx.ModelProto:
    """y = Reshape(x [4], shape [2]): zeros for `shape` are no shape of x, so it cannot run on zeros."""
    return _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [_io("x", "FP32", [4]), _io("shape", "INT64", [2])],
        [_io("y", "FP32", ["rows", "columns"])],
    )


def write(repository: Path, name: str, model: onnx.ModelProto, config: str | None = None, version: int = 1) -> Path:
    """Save a model as <repository>/<name>/<version>/model.onnx, with an optional config.pbtxt."""
    directory = repository / name
    (directory / str(version)).mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / str(version) / "model.onnx")
    if config is not None:
        (directory / "config.pbtxt").write_text(config)
    return directory
