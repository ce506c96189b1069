"""Rebuild the example models in this directory (needs the `onnx` package).

    python models/make_examples.py

mlp/1/model.onnx      x FP32 [-1, 4] -> probabilities FP32 [-1, 3]; no config.pbtxt:
                      everything is derived from the graph.
add_sub/1/model.onnx  INPUT0, INPUT1 FP32 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference;
                      config.pbtxt shows Triton-style dynamic batching settings.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 9  # what current onnxruntime releases load


def save(model: onnx.ModelProto, name: str) -> None:
    onnx.checker.check_model(model)
    path = HERE / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    weights = {
        "w1": rng.standard_normal((4, 8)).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.standard_normal((8, 3)).astype(np.float32),
        "b2": rng.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def add_sub() -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 16]) for n in ("INPUT0", "INPUT1")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return helper.make_model(
        helper.make_graph(nodes, "add_sub", inputs, outputs), opset_imports=OPSET, ir_version=IR_VERSION
    )


if __name__ == "__main__":
    save(mlp(), "mlp")
    save(add_sub(), "add_sub")
