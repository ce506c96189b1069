"""config.pbtxt's `sequence_batching` (requests sharing a correlation id) as typed, frozen settings.

It names the model inputs the server feeds itself (controls: start, end, ready, the correlation id;
states: the previous request's state output) and how sequences share an instance's batch slots
(the direct or oldest strategy). Parsed and checked with Triton's defaults; the engine routes the
sequences. Errors name the file, the field and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from server import protocol
from server.errors import ConfigError

# model_config imports this module: use its names at call time only, never at import.
from server.models import model_config

START, END, READY, CORRID = "start", "end", "ready", "corrid"
DIRECT, OLDEST = "direct", "oldest"
# Triton core's SEQUENCE_IDLE_DEFAULT_MICROSECONDS (src/constants.h), which its
# NormalizeModelConfig puts in place of an unset (0) max_sequence_idle_microseconds.
DEFAULT_IDLE_US = 1_000_000

KIND_BY_ENUM = {f"CONTROL_SEQUENCE_{kind.upper()}": kind for kind in (START, END, READY, CORRID)}
ENUM_BY_KIND = {kind: name for name, kind in KIND_BY_ENUM.items()}
# A flag control's [false, true] field -> the wire datatype of the tensor that carries it.
FLAG_FIELDS = {"int32_false_true": "INT32", "fp32_false_true": "FP32", "bool_false_true": "BOOL"}
FLAG_FIELD_BY_WIRE = {wire: field_name for field_name, wire in FLAG_FIELDS.items()}
# What Triton accepts for the correlation id's tensor (a 32-bit type gets the id's low 32 bits).
CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")
SECTION = "sequence_batching"


@dataclass(frozen=True)
class ControlInput:
    name: str  # the model input this control feeds
    kind: str  # START, END, READY or CORRID
    datatype: str  # wire datatype: INT32, FP32 or BOOL for a flag; CORRID's UINT64, INT64, UINT32, INT32 or BYTES
    false_value: int | float | bool | None = None  # flags only
    true_value: int | float | bool | None = None


@dataclass(frozen=True)
class InitialState:
    name: str
    datatype: str  # wire datatype
    dims: tuple[int, ...]  # fixed dims >= 1, no batch dimension
    data_file: str = ""  # "" = zeros; else relative to <model>/initial_state/ (raw little-endian bytes)


@dataclass(frozen=True)
class StateSpec:
    input_name: str
    output_name: str
    datatype: str  # wire datatype
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable
    initial: InitialState | None = None


@dataclass(frozen=True)
class SequenceSettings:
    where: str  # the file and field, for errors raised later (a control input missing from the graph)
    strategy: str = DIRECT
    max_sequence_idle_us: int = DEFAULT_IDLE_US
    max_queue_delay_us: int = 0  # direct's or oldest's
    minimum_slot_utilization: float = 0.0  # direct
    max_candidate_sequences: int = 0  # oldest; 0 only until max_batch_size is known (see completed)
    preferred_batch_sizes: tuple[int, ...] = ()  # oldest, sorted, unique
    controls: tuple[ControlInput, ...] = ()
    states: tuple[StateSpec, ...] = ()

    def control(self, kind: str) -> ControlInput | None:
        """The control of that kind, if configured."""
        return next((control for control in self.controls if control.kind == kind), None)

    @property
    def hidden_inputs(self) -> tuple[str, ...]:
        """Inputs the server feeds itself: the client never sends them."""
        return tuple(control.name for control in self.controls) + tuple(state.input_name for state in self.states)

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(state.output_name for state in self.states)

    def completed(self, max_batch_size: int) -> SequenceSettings:
        """These settings once max_batch_size is known (the config's, or the graph's when the config
        leaves it out), with Triton's defaults for what oldest leaves unset. Idempotent."""
        if self.strategy != OLDEST:
            return self
        too_big = [size for size in self.preferred_batch_sizes if max_batch_size and size > max_batch_size]
        if too_big:
            field_name = f"{self.where}: {SECTION}.oldest.preferred_batch_size"
            raise ConfigError(f"{field_name}: {too_big[0]} is outside 1..max_batch_size ({max_batch_size})")
        # Triton's SequenceBatchScheduler keeps max(1, max_batch_size) slots per instance unless
        # max_candidate_sequences > 0; its NormalizeModelConfig turns no preferred size into [max_batch_size].
        preferred = self.preferred_batch_sizes or ((max_batch_size,) if max_batch_size else ())
        candidates = self.max_candidate_sequences or max(1, max_batch_size)
        return dataclasses.replace(self, max_candidate_sequences=candidates, preferred_batch_sizes=preferred)

    def fill_proto(self, message) -> None:
        """Write these settings into `message`, a ModelConfig's sequence_batching, as Triton reports them."""
        message.max_sequence_idle_microseconds = self.max_sequence_idle_us
        strategy = getattr(message, self.strategy)  # the strategy_choice member: direct or oldest
        strategy.SetInParent()
        strategy.max_queue_delay_microseconds = self.max_queue_delay_us
        if self.strategy == OLDEST:
            strategy.max_candidate_sequences = self.max_candidate_sequences
            strategy.preferred_batch_size.extend(self.preferred_batch_sizes)
        else:
            strategy.minimum_slot_utilization = self.minimum_slot_utilization
        for control in self.controls:
            message.control_input.add(name=control.name, control=[_control_message(control)])
        types = model_config.CONFIG_TYPE_BY_WIRE
        for state in self.states:
            initial = [] if state.initial is None else [_initial_message(state.initial)]
            names = {"input_name": state.input_name, "output_name": state.output_name}
            message.state.add(**names, data_type=types[state.datatype], dims=state.dims, initial_state=initial)


def sequence_settings(proto, where: str, max_batch_size: int | None) -> SequenceSettings | None:
    """config.pbtxt's sequence_batching (a protocol.ModelConfig message), or None when absent.
    max_batch_size None (the config leaves it to the graph): oldest's defaults wait for `completed`."""
    if not proto.HasField(SECTION):
        return None
    batching = proto.sequence_batching
    if batching.iterative_sequence:
        raise ConfigError(f"{where}: {SECTION}.iterative_sequence: true is not supported by onnxserve")
    controls = _controls(batching, where)
    settings = SequenceSettings(
        where=where,
        # Triton's default for an unset (0) idle time.
        max_sequence_idle_us=batching.max_sequence_idle_microseconds or DEFAULT_IDLE_US,
        controls=controls,
        states=_states(batching, where, {control.name for control in controls}),
        **_strategy(batching, where),
    )
    return settings if max_batch_size is None else settings.completed(max_batch_size)


def _strategy(batching, where: str) -> dict:
    """SequenceSettings' strategy fields; direct is Triton's default when neither is given."""
    if batching.WhichOneof("strategy_choice") != "oldest":
        utilization = batching.direct.minimum_slot_utilization
        if not 0.0 <= utilization <= 1.0:  # NaN fails this too
            raise ConfigError(f"{where}: {SECTION}.direct.minimum_slot_utilization: {utilization} is outside [0, 1]")
        delay = batching.direct.max_queue_delay_microseconds
        return {"strategy": DIRECT, "max_queue_delay_us": delay, "minimum_slot_utilization": utilization}
    oldest = batching.oldest  # preserve_ordering is accepted: a sequence's requests are answered in order anyway
    field_name = f"{where}: {SECTION}.oldest"
    if oldest.max_candidate_sequences < 0:
        raise ConfigError(f"{field_name}.max_candidate_sequences: {oldest.max_candidate_sequences} is negative")
    for size in oldest.preferred_batch_size:
        if size < 1:
            raise ConfigError(f"{field_name}.preferred_batch_size: {size} is below 1")
    sizes, delay = tuple(sorted(set(oldest.preferred_batch_size))), oldest.max_queue_delay_microseconds
    candidates = oldest.max_candidate_sequences
    return dict(
        strategy=OLDEST, max_queue_delay_us=delay, max_candidate_sequences=candidates, preferred_batch_sizes=sizes
    )


def _controls(batching, where: str) -> tuple[ControlInput, ...]:
    controls: list[ControlInput] = []
    for index, given in enumerate(batching.control_input):
        field_name = f"{where}: {SECTION}.control_input[{index}]"
        if not given.name:
            raise ConfigError(f"{field_name}.name: missing")
        if any(control.name == given.name for control in controls):
            raise ConfigError(f"{field_name}.name: {given.name!r} is already a control input")
        if len(given.control) != 1:
            raise ConfigError(f"{field_name}.control: {len(given.control)} controls for {given.name!r}; give one")
        control = _control(given.name, given.control[0], f"{field_name}.control[0]")
        taken = [other.name for other in controls if other.kind == control.kind]
        if taken:
            raise ConfigError(f"{field_name}.control[0].kind: {ENUM_BY_KIND[control.kind]} is already on {taken[0]!r}")
        controls.append(control)
    return tuple(controls)


def _control(name: str, control, field_name: str) -> ControlInput:
    enum = control.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number.get(control.kind)
    if enum is None:
        raise ConfigError(f"{field_name}.kind: {control.kind} is not a control kind")
    flags = [flag for flag in FLAG_FIELDS if len(getattr(control, flag))]
    type_name = _type_name(control.data_type)
    if enum.name == "CONTROL_SEQUENCE_CORRID":
        if flags:
            values = list(getattr(control, flags[0]))
            raise ConfigError(f"{field_name}.{flags[0]}: {values}: CONTROL_SEQUENCE_CORRID takes a data_type only")
        if type_name not in CORRID_TYPES:
            raise ConfigError(f"{field_name}.data_type: {type_name} for {enum.name} is not one of {CORRID_TYPES}")
        return ControlInput(name, CORRID, model_config.WIRE_BY_CONFIG_TYPE[type_name])
    if type_name != "TYPE_INVALID":  # a flag's type follows from its values' field
        raise ConfigError(f"{field_name}.data_type: {type_name}: {enum.name} takes false/true values, not a data_type")
    if len(flags) != 1:
        raise ConfigError(f"{field_name}: {enum.name} of {name!r} sets {flags}; set exactly one of {list(FLAG_FIELDS)}")
    values = list(getattr(control, flags[0]))
    if len(values) != 2:
        raise ConfigError(f"{field_name}.{flags[0]}: {values}: give exactly 2 values, [false, true]")
    return ControlInput(name, KIND_BY_ENUM[enum.name], FLAG_FIELDS[flags[0]], values[0], values[1])


def _states(batching, where: str, control_names: set[str]) -> tuple[StateSpec, ...]:
    states: list[StateSpec] = []
    for index, given in enumerate(batching.state):
        field_name = f"{where}: {SECTION}.state[{index}]"
        state = _state(given, field_name)
        if state.input_name in control_names | {other.input_name for other in states}:
            raise ConfigError(f"{field_name}.input_name: {state.input_name!r} is already a control or state input")
        if any(other.output_name == state.output_name for other in states):
            raise ConfigError(f"{field_name}.output_name: {state.output_name!r} is already a state's output")
        states.append(state)
    return tuple(states)


def _state(given, field_name: str) -> StateSpec:
    # use_same_buffer_for_input_output and use_growable_memory are Triton's hints for how it keeps a
    # state's GPU memory; they are accepted and change nothing here.
    for name in ("input_name", "output_name"):
        if not getattr(given, name):
            raise ConfigError(f"{field_name}.{name}: missing")
    type_name = _type_name(given.data_type)
    if type_name not in model_config.WIRE_BY_CONFIG_TYPE:  # TYPE_INVALID: unset
        raise ConfigError(f"{field_name}.data_type: missing or unknown ({type_name}) for state {given.input_name!r}")
    if any(dim < -1 or dim == 0 for dim in given.dims):
        raise ConfigError(f"{field_name}.dims: {list(given.dims)} for state {given.input_name!r}: dims are >= 1 or -1")
    if len(given.initial_state) > 1:
        raise ConfigError(f"{field_name}.initial_state: {len(given.initial_state)} given; a state takes one at most")
    initial = _initial(given, type_name, f"{field_name}.initial_state[0]") if given.initial_state else None
    wire = model_config.WIRE_BY_CONFIG_TYPE[type_name]
    return StateSpec(given.input_name, given.output_name, wire, tuple(given.dims), initial)


def _initial(state, state_type: str, field_name: str) -> InitialState:
    """A state's initial value, checked as Triton's SequenceBatchScheduler checks it."""
    given = state.initial_state[0]
    if not given.name:
        raise ConfigError(f"{field_name}.name: missing")
    type_name = _type_name(given.data_type)
    if type_name != state_type:
        raise ConfigError(f"{field_name}.data_type: {type_name} differs from the state's {state_type}")
    dims = list(given.dims)
    if any(dim < 1 for dim in dims):
        raise ConfigError(f"{field_name}.dims: {dims}: an initial state has fixed dims >= 1")
    if len(dims) != len(state.dims) or any(fixed not in (-1, dim) for fixed, dim in zip(state.dims, dims, strict=True)):
        raise ConfigError(f"{field_name}.dims: {dims} do not fit the state's dims {list(state.dims)}")
    # Triton uses zeros whenever zero_data is set, whatever its value.
    choice = given.WhichOneof("state_data")
    if choice is None:
        raise ConfigError(f"{field_name}: set zero_data or data_file")
    data_file = given.data_file if choice == "data_file" else ""
    if choice == "data_file" and not model_config._inside(data_file):
        raise ConfigError(f"{field_name}.data_file: {data_file!r} must be a path inside <model>/initial_state/")
    return InitialState(given.name, model_config.WIRE_BY_CONFIG_TYPE[type_name], tuple(dims), data_file)


def _type_name(number: int) -> str:
    """A DataType's name; an unknown number (proto3 enums are open) as the number itself."""
    value = protocol.DataType.values_by_number.get(number)
    return value.name if value is not None else str(number)


def _control_message(control: ControlInput) -> dict:
    """A ControlInput's one Control, as message fields."""
    if control.kind == CORRID:
        return {"kind": ENUM_BY_KIND[CORRID], "data_type": model_config.CONFIG_TYPE_BY_WIRE[control.datatype]}
    values = [control.false_value, control.true_value]
    return {"kind": ENUM_BY_KIND[control.kind], FLAG_FIELD_BY_WIRE[control.datatype]: values}


def _initial_message(initial: InitialState) -> dict:
    """An InitialState as message fields."""
    data = {"data_file": initial.data_file} if initial.data_file else {"zero_data": True}
    data_type = model_config.CONFIG_TYPE_BY_WIRE[initial.datatype]
    return {"name": initial.name, "data_type": data_type, "dims": initial.dims, **data}
