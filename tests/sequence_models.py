"""Stand-ins for Triton's sequence example models (what NVIDIA's sequence example programs call),
and an accumulator with implicit state: ONNX graphs built with onnx.helper, and their config.pbtxt."""

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from tests.onnx_models import _io, _model, write

ROW = ["batch", 1]
FLAGS = """
    {{ name: "{name}" control [ {{ kind: CONTROL_SEQUENCE_{kind} int32_false_true: [ 0, 1 ] }} ] }}"""
CORRID = """
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: {datatype} }} ] }}"""
INT_STATE = """
  state [ {{ input_name: "{name}_IN" output_name: "{name}_OUT" data_type: TYPE_INT32 dims: [ 1 ]
            initial_state: {{ name: "zeros" data_type: TYPE_INT32 dims: [ 1 ] zero_data: true }} }} ]"""
INSTANCES = "instance_group [ {{ count: {count} kind: KIND_CPU }} ]\n"
TENSORS = """
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]"""


def config(
    name: str,
    controls: tuple[str, ...],
    corrid: str = "",
    strategy: str = "",
    state: str = "",
    extra: str = "",
    after: str = "",
) -> str:
    """A config.pbtxt with sequence_batching: int32 [0, 1] flags, an optional CORRID of `corrid`'s type."""
    inputs = [FLAGS.format(name=kind, kind=kind) for kind in controls]
    if corrid:
        inputs.append(CORRID.format(datatype=corrid))
    return (
        f'name: "{name}"\nmax_batch_size: 8\nsequence_batching {{\n  {strategy}\n'
        f"  control_input [{','.join(inputs)}\n  ]{state}\n{extra}}}{TENSORS}\n{after}"
    )


def _flags(*names: str) -> list:
    return [_io(name, "INT32", ROW) for name in names]


def simple_sequence() -> onnx.ModelProto:
    """Triton's `simple_sequence` as its examples expect it: OUTPUT = (INPUT + START) * READY."""
    nodes = [
        helper.make_node("Add", ["INPUT", "START"], ["started"]),
        helper.make_node("Mul", ["started", "READY"], ["OUTPUT"]),
    ]
    return _model(nodes, _flags("INPUT", "START", "READY"), [_io("OUTPUT", "INT32", ROW)])


def simple_dyna_sequence() -> onnx.ModelProto:
    """Triton's `simple_dyna_sequence`: OUTPUT = (INPUT + START + END * CORRID) * READY, CORRID UINT64."""
    nodes = [
        helper.make_node("Cast", ["CORRID"], ["id"], to=TensorProto.INT32),
        helper.make_node("Mul", ["END", "id"], ["ending"]),
        helper.make_node("Add", ["INPUT", "START"], ["started"]),
        helper.make_node("Add", ["started", "ending"], ["sum"]),
        helper.make_node("Mul", ["sum", "READY"], ["OUTPUT"]),
    ]
    inputs = _flags("INPUT", "START", "END", "READY") + [_io("CORRID", "UINT64", ROW)]
    return _model(nodes, inputs, [_io("OUTPUT", "INT32", ROW)])


def simple_string_dyna_sequence() -> onnx.ModelProto:
    """Triton's `simple_string_dyna_sequence`, an accumulator with implicit state and a string id:
    STATE_OUT = INPUT + STATE_IN (zeros at START); OUTPUT = STATE_OUT + END * int(CORRID)."""
    nodes = [
        helper.make_node("Add", ["INPUT", "STATE_IN"], ["STATE_OUT"]),
        helper.make_node("Cast", ["CORRID"], ["id"], to=TensorProto.INT32),
        helper.make_node("Mul", ["END", "id"], ["ending"]),
        helper.make_node("Add", ["STATE_OUT", "ending"], ["total"]),
        helper.make_node("Mul", ["total", "READY"], ["OUTPUT"]),
    ]
    inputs = _flags("INPUT", "START", "END", "READY", "STATE_IN") + [_io("CORRID", "BYTES", ROW)]
    return _model(nodes, inputs, [_io("OUTPUT", "INT32", ROW), _io("STATE_OUT", "INT32", ROW)])


def accumulator(state: str = "STATE") -> onnx.ModelProto:
    """OUTPUT = STATE_OUT = INPUT + STATE_IN: each sequence's running sum, kept by the server."""
    nodes = [
        helper.make_node("Add", ["INPUT", f"{state}_IN"], [f"{state}_OUT"]),
        helper.make_node("Identity", [f"{state}_OUT"], ["OUTPUT"]),
    ]
    outputs = [_io("OUTPUT", "INT32", ROW), _io(f"{state}_OUT", "INT32", ROW)]
    return _model(nodes, _flags("INPUT", "START", f"{state}_IN"), outputs)


OLDEST = "oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }"


def write_examples(repository: Path) -> None:
    """The three models NVIDIA's sequence example programs call, with Triton's configs."""
    write(repository, "simple_sequence", simple_sequence(), config("simple_sequence", ("START", "READY")))
    dyna = ("START", "END", "READY")
    write(
        repository,
        "simple_dyna_sequence",
        simple_dyna_sequence(),
        config("simple_dyna_sequence", dyna, "TYPE_UINT64", OLDEST),
    )
    write(
        repository,
        "simple_string_dyna_sequence",
        simple_string_dyna_sequence(),
        config("simple_string_dyna_sequence", dyna, "TYPE_STRING", OLDEST, INT_STATE.format(name="STATE")),
    )


def write_accumulator(
    repository: Path,
    name: str = "accumulator",
    strategy: str = OLDEST,
    extra: str = "",
    after: str = "",
    state_name: str = "STATE",
) -> Path:
    """The accumulator with its state in config.pbtxt; `extra`: more sequence_batching fields; `after`:
    more config fields; `state_name`: its state tensors' prefix (another one is another state signature)."""
    state = INT_STATE.format(name=state_name)
    text = config(name, ("START",), strategy=strategy, state=state, extra=extra, after=after)
    return write(repository, name, accumulator(state_name), text)
