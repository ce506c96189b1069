"""Build the benchmark model repository (needs `onnx`; `onnxruntime` for the checks).

    python bench/make_models.py OUTDIR            # all three models
    python bench/make_models.py OUTDIR mlp        # just some of them

Writes a Triton-layout repository, OUTDIR/<name>/1/model.onnx without any config.pbtxt (the
benchmark measures default settings, as a new user gets them), for three models with random weights (numpy default_rng(0)); what matters is the shape of the
work, not the answers:

mlp       x FP32 [batch, 4] -> Gemm 4x16 + Relu -> Gemm 16x3 -> Softmax -> probabilities FP32
          [batch, 3]. Tiny: serving overhead is everything.
resnet50  input FP32 [batch, 3, 224, 224] -> logits FP32 [batch, 1000]. ResNet-50 v1 (bottleneck
          stages [3, 4, 6, 3], stride on the 3x3 conv, projection shortcuts), BatchNorm folded
          into the convolutions, ~25.5 M parameters. Compute-bound (~4 GFLOP per image).
encoder   input_ids, attention_mask INT64 [batch, seq] -> last_hidden_state FP32 [batch, seq, 256]
          and pooled FP32 [batch, 256] (hidden state of token 0). BERT-like: vocab 30522, learned
          positions (max 512), 4 post-LN layers, 4 heads, FFN 1024 with erf GELU; masked keys get
          -10000 added before the softmax. Batch and seq are both dynamic.

Opset 17, IR version 9 (what onnxruntime 1.31 loads). Every model is checked with
onnx.checker and run in onnxruntime (batch 1 and 4) before it is written, and the files are
byte-for-byte the same on every run. Importable: build(name) and write_repository(outdir, names).
Run as a script it also prints onnxruntime's in-process batch-1 latency for each model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
NAMES = ("mlp", "resnet50", "encoder")


class _Graph:
    """Collects nodes and initializers; names are generated in a fixed order (deterministic)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, value, prefix: str = "c", dtype=np.float32) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, outputs: list[str] | None = None, **attrs):
        outputs = outputs or [self.name(prefix or op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name("n_" + op_type), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="onnxserve-bench",
        )
        onnx.checker.check_model(model, full_check=True)
        return model


# --- mlp ------------------------------------------------------------------------------------


def _mlp() -> onnx.ModelProto:
    g = _Graph()
    w1 = g.const(g.rng.standard_normal((4, 16)) * np.sqrt(2 / 4), "w1")
    b1 = g.const(g.rng.standard_normal(16) * 0.1, "b1")
    w2 = g.const(g.rng.standard_normal((16, 3)) * np.sqrt(1 / 16), "w2")
    b2 = g.const(g.rng.standard_normal(3) * 0.1, "b2")
    h = g.op("Relu", [g.op("Gemm", ["x", w1, b1])])
    logits = g.op("Gemm", [h, w2, b2], "logits")
    g.op("Softmax", [logits], outputs=["probabilities"], axis=-1)
    return g.model(
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
    )


# --- resnet50 -------------------------------------------------------------------------------


def _conv(g: _Graph, x: str, cin: int, cout: int, k: int, stride: int, relu: bool, gain: float = 1.0) -> str:
    """Conv with BatchNorm already folded in: He-normal weights (times gain), small bias."""
    w = g.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(gain * np.sqrt(2.0 / (cin * k * k)))
    b = g.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
    y = g.op(
        "Conv",
        [x, g.const(w, "conv_w"), g.const(b, "conv_b")],
        "conv",
        kernel_shape=[k, k],
        strides=[stride, stride],
        pads=[k // 2] * 4,
    )
    return g.op("Relu", [y]) if relu else y


def _resnet50() -> onnx.ModelProto:
    g = _Graph()
    x = _conv(g, "input", 3, 64, 7, 2, relu=True)
    x = g.op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
        cout = width * 4
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            y = _conv(g, x, cin, width, 1, 1, relu=True)
            y = _conv(g, y, width, width, 3, stride, relu=True)
            # Small residual-branch gain (like a small BN gamma) keeps the residual stream's
            # variance from growing block after block.
            y = _conv(g, y, width, cout, 1, 1, relu=False, gain=0.2)
            shortcut = _conv(g, x, cin, cout, 1, stride, relu=False, gain=0.5) if block == 0 else x
            x = g.op("Relu", [g.op("Add", [y, shortcut])])
            cin = cout
    x = g.op("GlobalAveragePool", [x], "gap")
    x = g.op("Flatten", [x], "flat", axis=1)
    fc_w = g.rng.standard_normal((1000, 2048), dtype=np.float32) * np.float32(np.sqrt(1.0 / 2048))
    fc_b = np.zeros(1000, dtype=np.float32)
    g.op("Gemm", [x, g.const(fc_w, "fc_w"), g.const(fc_b, "fc_b")], outputs=["logits"], transB=1)
    return g.model(
        "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
    )


# --- encoder --------------------------------------------------------------------------------

VOCAB, HIDDEN, LAYERS, HEADS, FFN, MAX_POSITIONS = 30522, 256, 4, 4, 1024, 512


def _encoder() -> onnx.ModelProto:
    g = _Graph()
    head_dim = HIDDEN // HEADS

    def weight(*shape):  # BERT's initialiser: normal(0, 0.02)
        return g.const(g.rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02), "w")

    def zeros(n):
        return g.const(np.zeros(n, np.float32), "b")

    def layer_norm(x):
        return g.op(
            "LayerNormalization",
            [x, g.const(np.ones(HIDDEN, np.float32), "ln_g"), zeros(HIDDEN)],
            "ln",
            axis=-1,
            epsilon=1e-12,
        )

    def dense(x, n_in, n_out):
        return g.op("Add", [g.op("MatMul", [x, weight(n_in, n_out)]), zeros(n_out)])

    # Dynamic shapes: [B, S] from the input, then [B, S, heads, head_dim] and [B, S, hidden].
    batch_seq = g.op("Shape", ["input_ids"], "batch_seq")
    seq = g.op("Shape", ["input_ids"], "seq", start=1, end=2)
    split_shape = g.op("Concat", [batch_seq, g.const([HEADS, head_dim], "heads", np.int64)], "split_shape", axis=0)
    merge_shape = g.op("Concat", [batch_seq, g.const([HIDDEN], "hidden", np.int64)], "merge_shape", axis=0)

    # Embeddings: word + learned position (+ token type 0, folded into a constant row).
    words = g.op("Gather", [weight(VOCAB, HIDDEN), "input_ids"], "words", axis=0)
    positions = g.op(
        "Slice",
        [weight(MAX_POSITIONS, HIDDEN), g.const([0], "zero", np.int64), seq, g.const([0], "axis0", np.int64)],
        "positions",
    )
    x = g.op("Add", [g.op("Add", [words, positions]), weight(HIDDEN)])
    x = layer_norm(x)

    # Additive mask [B, 1, 1, S]: 0 where attention_mask is 1, -10000 where it is 0.
    mask = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask = g.op("Mul", [g.op("Sub", [g.const(1.0, "one"), mask]), g.const(-10000.0, "neg")], "mask_add")
    mask = g.op("Unsqueeze", [mask, g.const([1, 2], "mask_axes", np.int64)], "mask4d")
    scale = g.const(1.0 / np.sqrt(head_dim), "scale")
    half, one, rsqrt2 = g.const(0.5, "half"), g.const(1.0, "one"), g.const(1.0 / np.sqrt(2.0), "rsqrt2")

    for _ in range(LAYERS):

        def heads(t, perm):
            return g.op("Transpose", [g.op("Reshape", [t, split_shape])], perm=perm)

        q = heads(dense(x, HIDDEN, HIDDEN), [0, 2, 1, 3])  # [B, h, S, d]
        k = heads(dense(x, HIDDEN, HIDDEN), [0, 2, 3, 1])  # [B, h, d, S]
        v = heads(dense(x, HIDDEN, HIDDEN), [0, 2, 1, 3])  # [B, h, S, d]
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask], "scores")
        probs = g.op("Softmax", [scores], "probs", axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # [B, S, h, d]
        context = g.op("Reshape", [context, merge_shape], "context")
        x = layer_norm(g.op("Add", [dense(context, HIDDEN, HIDDEN), x]))
        h = dense(x, HIDDEN, FFN)
        gelu = g.op(
            "Mul", [g.op("Mul", [h, half]), g.op("Add", [g.op("Erf", [g.op("Mul", [h, rsqrt2])]), one])], "gelu"
        )
        x = layer_norm(g.op("Add", [dense(gelu, FFN, HIDDEN), x]))

    g.op("Identity", [x], outputs=["last_hidden_state"])
    g.op("Gather", [x, g.const(0, "token0", np.int64)], outputs=["pooled"], axis=1)
    return g.model(
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN]),
        ],
    )


# --- accumulator (the GPU check's stateful stand-in; not a benchmark model) -----------------


def _accumulator() -> onnx.ModelProto:
    """OUTPUT = STATE_OUT = INPUT + STATE_IN, INT32 [batch, 1], and START, the control input Triton's
    config feeds (unused: the server resets the state at START): each sequence's running sum, its
    state kept by the server between requests (sequence_batching)."""
    g = _Graph()
    g.op("Add", ["INPUT", "STATE_IN"], outputs=["STATE_OUT"])
    g.op("Identity", ["STATE_OUT"], outputs=["OUTPUT"])
    names = ("INPUT", "START", "STATE_IN")
    row = ["batch", 1]
    return g.model(
        "accumulator",
        [helper.make_tensor_value_info(name, TensorProto.INT32, row) for name in names],
        [helper.make_tensor_value_info(name, TensorProto.INT32, row) for name in ("OUTPUT", "STATE_OUT")],
    )


BUILDERS = {"mlp": _mlp, "resnet50": _resnet50, "encoder": _encoder, "accumulator": _accumulator}


def build(name: str) -> onnx.ModelProto:
    """The named benchmark model (checked by onnx.checker); same weights on every call."""
    if name not in BUILDERS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {list(NAMES)}")
    return BUILDERS[name]()


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


# --- checks, config, timing -----------------------------------------------------------------


def sample_inputs(name: str, batch: int, seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    if name == "mlp":
        return {"x": rng.standard_normal((batch, 4), dtype=np.float32)}
    if name == "resnet50":
        return {"input": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    mask = np.ones((batch, seq), np.int64)
    mask[1:, seq // 2 :] = 0  # every row but the first padded to half length
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq), dtype=np.int64), "attention_mask": mask}


def _session(model_bytes: bytes, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def check_runs(name: str, model_bytes: bytes) -> None:
    """Run in onnxruntime at batch 1 and 4 (encoder: seq 16 and 128); outputs finite and shaped."""
    session = _session(model_bytes)
    cases = [(b, s) for b in (1, 4) for s in ((16, 128) if name == "encoder" else (16,))]
    for batch, seq in cases:
        feeds = sample_inputs(name, batch, seq)
        outputs = session.run(None, feeds)
        for meta, value in zip(session.get_outputs(), outputs):
            expected = [batch if d == "batch" else seq if d == "seq" else d for d in meta.shape]
            if list(value.shape) != expected or value.dtype != np.float32 or not np.all(np.isfinite(value)):
                raise RuntimeError(
                    f"{name}: output {meta.name} at batch {batch}: shape {value.shape}, "
                    f"dtype {value.dtype}, finite {np.all(np.isfinite(value))}"
                )
        if batch > 1:  # batching must not mix rows: row 0 equals the batch-1 answer
            single = session.run(None, {k: v[:1] for k, v in feeds.items()})
            for a, b in zip(outputs, single):
                if not np.allclose(a[:1], b, rtol=1e-3, atol=1e-4):
                    raise RuntimeError(f"{name}: row 0 of batch {batch} differs from batch 1")


def write_repository(outdir, names=None, check: bool = True) -> dict[str, Path]:
    """Write OUTDIR/<name>/1/model.onnx, and no config.pbtxt: every model is served with the
    defaults a new user gets, derived from the graph and chosen at load. Returns the model paths."""
    outdir = Path(outdir)
    written = {}
    for name in names or NAMES:
        model_bytes = build(name).SerializeToString()
        if check:
            check_runs(name, model_bytes)
        path = outdir / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model_bytes)
        written[name] = path
    return written


def batch1_latency(name: str, path: Path, runs: int) -> float:
    """Median seconds per batch-1 inference: 2 threads, sequential, all graph optimisations."""
    session = _session(str(path))
    feeds = sample_inputs(name, 1, 128)
    for _ in range(max(3, runs // 10)):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or any(n not in NAMES for n in argv[1:]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    outdir, names = Path(argv[0]), argv[1:] or list(NAMES)
    for name in names:
        start = time.perf_counter()
        path = write_repository(outdir, [name])[name]
        built = time.perf_counter() - start
        params = parameter_count(onnx.load(str(path), load_external_data=False))
        runs = 10 if name == "resnet50" else 50
        latency = batch1_latency(name, path, runs)
        shape = " (seq 128)" if name == "encoder" else ""
        print(
            f"{name:9s} {params / 1e6:7.2f} M params  {path.stat().st_size / 2**20:7.1f} MiB  "
            f"built+checked {built:5.1f} s  onnxruntime batch 1{shape}: {latency * 1e3:9.3f} ms (median of {runs})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
