"""What a sequence's request carries into the model beside the caller's tensors: the correlation id
and flags read from the request's parameters, the control inputs (START, END, READY, CORRID) as
config.pbtxt encodes them, and the implicit state's initial values. Checked against the graph at load."""

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from server.bytes_codec import deserialize_bytes, object_array
from server.errors import ConfigError, InvalidInput
from server.models.sequence_config import CORRID, END, READY, START, SequenceSettings
from server.tensors import DATATYPES, TensorSpec

Key = int | str
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = "sequence_id", "sequence_start", "sequence_end"
ID_RANGES = {"INT32": (-(2**31), 2**31 - 1), "UINT32": (0, 2**32 - 1), "INT64": (-(2**63), 2**63 - 1)}
ID_RANGES["UINT64"] = (0, 2**64 - 1)


def parse_sequence(parameters: Mapping[str, object], label: str) -> tuple[Key, bool, bool]:
    """The request's correlation id (a non-zero unsigned integer or a non-empty string, as Triton's)
    and its START and END flags; InvalidInput as Triton words it when the id is missing."""
    key = parameters.get(SEQUENCE_ID) if parameters else None
    if isinstance(key, bool) or not isinstance(key, (int, str)) or key == 0 or key == "":
        shown = "" if key is None else f"; got {type(key).__name__} {key!r}"
        raise InvalidInput(f"inference request to {label} must specify a non-zero or non-empty correlation ID{shown}")
    if isinstance(key, int) and not 0 < key < 2**64:
        raise InvalidInput(f"{label}: parameter '{SEQUENCE_ID}' {key} is outside the unsigned 64-bit range")
    return key, _flag(parameters, SEQUENCE_START, label), _flag(parameters, SEQUENCE_END, label)


def _flag(parameters: Mapping[str, object], name: str, label: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{label}: parameter '{name}' must be a boolean; got {type(value).__name__} {value!r}")
    return value


def control_feeds(
    settings: SequenceSettings, key: Key, start: bool, end: bool, max_batch_size: int
) -> dict[str, np.ndarray]:
    """The control inputs of one request, one row of each; InvalidInput if its id cannot be CORRID's."""
    shape = (1, 1) if max_batch_size else (1,)
    feeds = {}
    for control in settings.controls:
        if control.kind == CORRID:
            feeds[control.name] = _correlation(control.datatype, key, shape, control.name)
            continue
        on = {START: start, END: end, READY: True}[control.kind]
        value = control.true_value if on else control.false_value
        feeds[control.name] = np.full(shape, value, dtype=DATATYPES[control.datatype].numpy)
    return feeds


def _correlation(datatype: str, key: Key, shape: tuple[int, ...], name: str) -> np.ndarray:
    if datatype == "BYTES":
        return object_array([str(key)], shape)
    low, high = ID_RANGES[datatype]
    if isinstance(key, str) or not low <= key <= high:
        raise InvalidInput(
            f"sequence id {key!r} cannot feed control input '{name}' (CORRID, {datatype}): "
            f"it takes integers in {low}..{high}"
        )
    return np.full(shape, key, dtype=DATATYPES[datatype].numpy)


def state_key(settings: SequenceSettings) -> tuple:
    """What must stay the same for a sequence's state to carry over to a reloaded version."""
    return settings.controls, tuple((s.input_name, s.output_name, s.datatype, s.dims) for s in settings.states)


def check_graph(settings: SequenceSettings, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Every control and state names a tensor of the graph with the configured datatype."""
    graph_inputs = {spec.name: spec for spec in inputs}
    graph_outputs = {spec.name: spec for spec in outputs}
    for index, control in enumerate(settings.controls):
        where = f"{settings.where}: sequence_batching.control_input[{index}]"
        _check_tensor(graph_inputs, control.name, control.datatype, f"{where}.name", "input")
    for index, state in enumerate(settings.states):
        where = f"{settings.where}: sequence_batching.state[{index}]"
        _check_tensor(graph_inputs, state.input_name, state.datatype, f"{where}.input_name", "input")
        _check_tensor(graph_outputs, state.output_name, state.datatype, f"{where}.output_name", "output")


def _check_tensor(graph: dict[str, TensorSpec], name: str, datatype: str, where: str, kind: str) -> None:
    spec = graph.get(name)
    if spec is None:
        raise ConfigError(f"{where}: '{name}' is not an {kind} of the model; its {kind}s are {sorted(graph)}")
    if spec.datatype != datatype:
        raise ConfigError(f"{where}: '{name}' is {datatype} in the config but {spec.datatype} in the model")


def initial_states(settings: SequenceSettings, model_dir: Path, max_batch_size: int) -> dict[str, np.ndarray]:
    """Each state's value at a sequence's START: its initial_state (zeros, or a file of raw values
    in <model>/initial_state/), else zeros, with a variable dimension starting empty. Blocking."""
    values = {}
    for index, state in enumerate(settings.states):
        where = f"{settings.where}: sequence_batching.state[{index}].initial_state"
        initial = state.initial
        dims = initial.dims if initial is not None else tuple(max(dim, 0) for dim in state.dims)
        if initial is not None and initial.data_file:
            value = _from_file(model_dir / "initial_state" / initial.data_file, state.datatype, dims, where)
        elif state.datatype == "BYTES":
            value = object_array([""] * math.prod(dims), dims)
        else:
            value = np.zeros(dims, dtype=DATATYPES[state.datatype].numpy)
        values[state.input_name] = value[np.newaxis] if max_batch_size else value
    return values


def _from_file(path: Path, datatype: str, dims: tuple[int, ...], where: str) -> np.ndarray:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}.data_file: cannot read {path}: {err}") from None
    count = math.prod(dims)
    if datatype == "BYTES":
        return object_array(deserialize_bytes(raw, count, f"{where}.data_file {path}"), dims)
    dtype = np.dtype(DATATYPES[datatype].numpy)
    if len(raw) != count * dtype.itemsize:
        raise ConfigError(
            f"{where}.data_file: {path} holds {len(raw)} bytes; {datatype} {list(dims)} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
