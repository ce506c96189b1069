"""config.pbtxt's sequence_batching parsed into SequenceSettings, checked, and reported back."""

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from server import protocol
from server.errors import ConfigError
from server.frontend.model_info import model_config_proto
from server.models import sequence_config
from server.models.model_config import load_model_settings, settings_from_json
from server.models.sequence_config import (
    CORRID,
    DEFAULT_IDLE_US,
    DIRECT,
    END,
    OLDEST,
    READY,
    START,
    ControlInput,
    InitialState,
    SequenceSettings,
    StateSpec,
)

ROOT = Path(__file__).resolve().parents[2]


def flag(name: str, kind: str, values: str = "int32_false_true: [ 0, 1 ]") -> str:
    return f'{{ name: "{name}" control [ {{ kind: CONTROL_SEQUENCE_{kind} {values} }} ] }}'


# Triton's docs/examples simple_sequence (platform changed to ONNX): START and READY, no strategy.
SIMPLE_SEQUENCE = f"""
name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
sequence_batching {{ control_input [ {flag("START", "START")}, {flag("READY", "READY")} ] }}
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU }} ]
"""
# Triton's simple_dyna_sequence: the oldest strategy, and the correlation id as an input.
SIMPLE_DYNA_SEQUENCE = f"""
name: "m" max_batch_size: 8
sequence_batching {{
  oldest {{ max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }}
  control_input [ {flag("START", "START")}, {flag("END", "END")}, {flag("READY", "READY")},
    {flag("CORRID", "CORRID", "data_type: TYPE_UINT64")} ]
}}
"""
STATE = """
  state [ { input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_INT32 dims: [1]
    initial_state: { data_type: TYPE_INT32 dims: [1] zero_data: true name: "zeros" } } ]
"""
IMPLICIT_STATE = f"""
name: "m" max_batch_size: 4
sequence_batching {{ control_input [ {flag("START", "START")}, {flag("READY", "READY")} ] {STATE} }}
"""


def settings_of(tmp_path: Path, text: str):
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return load_model_settings(model)


def sequence_of(tmp_path: Path, text: str) -> SequenceSettings:
    sequence = settings_of(tmp_path, text).sequence
    assert sequence is not None
    return sequence


def test_tritons_simple_sequence_parses_with_the_direct_strategy(tmp_path):
    sequence = sequence_of(tmp_path, SIMPLE_SEQUENCE)
    assert (sequence.strategy, sequence.max_sequence_idle_us, sequence.max_queue_delay_us) == (DIRECT, 1_000_000, 0)
    assert sequence.controls == (
        ControlInput("START", START, "INT32", 0, 1),
        ControlInput("READY", READY, "INT32", 0, 1),
    )
    assert sequence.control(READY).name == "READY" and sequence.control(END) is None
    assert sequence.hidden_inputs == ("START", "READY") and sequence.state_outputs == ()
    assert str(tmp_path / "m" / "config.pbtxt") in sequence.where


def test_tritons_simple_dyna_sequence_parses_with_the_oldest_strategy(tmp_path):
    sequence = sequence_of(tmp_path, SIMPLE_DYNA_SEQUENCE)
    assert (sequence.strategy, sequence.max_candidate_sequences, sequence.max_queue_delay_us) == (OLDEST, 1024, 10000)
    assert [c.kind for c in sequence.controls] == [START, END, READY, CORRID]
    assert sequence.control(CORRID) == ControlInput("CORRID", CORRID, "UINT64")
    assert sequence.preferred_batch_sizes == (8,)  # Triton's NormalizeModelConfig: none given -> [max_batch_size]


def test_implicit_state_with_zeros_for_a_start(tmp_path):
    sequence = sequence_of(tmp_path, IMPLICIT_STATE)
    initial = InitialState("zeros", "INT32", (1,))
    assert sequence.states == (StateSpec("INPUT_STATE", "OUTPUT_STATE", "INT32", (1,), initial),)
    assert sequence.hidden_inputs == ("START", "READY", "INPUT_STATE")
    assert sequence.state_outputs == ("OUTPUT_STATE",)


@pytest.mark.parametrize(
    "values, datatype, false_value, true_value",
    [
        ("fp32_false_true: [ 0.0, 1.0 ]", "FP32", 0.0, 1.0),
        ("bool_false_true: [ false, true ]", "BOOL", False, True),
        ("int32_false_true: [ 7, -7 ]", "INT32", 7, -7),
    ],
)
def test_flags_take_their_type_from_the_values_field(tmp_path, values, datatype, false_value, true_value):
    sequence = sequence_of(tmp_path, f"sequence_batching {{ control_input [ {flag('S', 'START', values)} ] }}")
    assert sequence.controls == (ControlInput("S", START, datatype, false_value, true_value),)


@pytest.mark.parametrize(
    "type_name, wire",
    [("TYPE_UINT64", "UINT64"), ("TYPE_INT64", "INT64"), ("TYPE_UINT32", "UINT32"), ("TYPE_STRING", "BYTES")],
)
def test_correlation_id_types(tmp_path, type_name, wire):
    text = f"sequence_batching {{ control_input [ {flag('C', 'CORRID', f'data_type: {type_name}')} ] }}"
    assert sequence_of(tmp_path, text).control(CORRID).datatype == wire


def test_no_sequence_batching_means_none(tmp_path):
    assert settings_of(tmp_path, "max_batch_size: 8 dynamic_batching { }").sequence is None


@pytest.mark.parametrize(
    "text, expected",
    [
        # Triton: an unset (0) idle time is 1 s; max_candidate_sequences 0 is max(1, max_batch_size).
        ("max_batch_size: 4 sequence_batching { oldest { } }", (DEFAULT_IDLE_US, 4, (4,))),
        ("max_batch_size: 0 sequence_batching { oldest { } }", (DEFAULT_IDLE_US, 1, ())),
        (
            "max_batch_size: 8 sequence_batching { max_sequence_idle_microseconds: 5 "
            "oldest { max_candidate_sequences: 3 preferred_batch_size: [ 4, 2, 4 ] } }",
            (5, 3, (2, 4)),
        ),
        ("sequence_batching { oldest { } }", (DEFAULT_IDLE_US, 0, ())),  # waits for the graph's max_batch_size
        ("sequence_batching { }", (DEFAULT_IDLE_US, 0, ())),
    ],
)
def test_tritons_defaults(tmp_path, text, expected):
    sequence = sequence_of(tmp_path, text)
    assert (sequence.max_sequence_idle_us, sequence.max_candidate_sequences, sequence.preferred_batch_sizes) == expected


def test_oldest_defaults_wait_for_the_graphs_max_batch_size(tmp_path):
    sequence = sequence_of(tmp_path, "sequence_batching { oldest { preferred_batch_size: [ 2 ] } }")
    completed = sequence.completed(16)
    assert (completed.max_candidate_sequences, completed.preferred_batch_sizes) == (16, (2,))
    assert completed.completed(16) == completed
    assert sequence_of(tmp_path, "sequence_batching { oldest { } }").completed(16).preferred_batch_sizes == (16,)
    with pytest.raises(ConfigError, match=r"oldest.preferred_batch_size: 2 is outside 1..max_batch_size \(1\)"):
        sequence.completed(1)
    direct = sequence_of(tmp_path, "sequence_batching { direct { minimum_slot_utilization: 0.5 } }")
    assert direct.completed(8) == direct and direct.minimum_slot_utilization == 0.5


def test_accepted_hints_change_nothing(tmp_path):
    state = STATE.replace("dims: [1]\n", "dims: [1] use_same_buffer_for_input_output: true use_growable_memory: true\n")
    text = f"max_batch_size: 2 sequence_batching {{ oldest {{ preserve_ordering: true }} {state} }}"
    sequence = sequence_of(tmp_path, text)
    assert sequence.strategy == OLDEST and sequence.states[0].input_name == "INPUT_STATE"


def test_an_initial_state_from_a_file_and_variable_state_dims(tmp_path):
    text = (
        'sequence_batching { state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ -1, 4 ]'
        ' initial_state { name: "warm" data_type: TYPE_FP32 dims: [ 2, 4 ] data_file: "sub/state.bin" } } ] }'
    )
    (state,) = sequence_of(tmp_path, text).states
    assert state.dims == (-1, 4) and state.initial == InitialState("warm", "FP32", (2, 4), "sub/state.bin")


def test_a_json_config_carries_sequence_batching():
    settings = settings_from_json(
        '{"max_batch_size": 4, "sequence_batching": {"oldest": {"max_candidate_sequences": 2},'
        ' "control_input": [{"name": "S", "control": [{"kind": "CONTROL_SEQUENCE_START", "bool_false_true": [false, true]}]}]}}',
        "m",
    )
    assert settings.sequence.strategy == OLDEST and settings.sequence.control(START).datatype == "BOOL"


CONTROL = "sequence_batching { control_input [ %s ] }"
STATE_WITH = 'sequence_batching { state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 dims: [ 2 ] %s } ] }'


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            CONTROL % "{ control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] } ] }",
            "control_input[0].name",
        ),
        (CONTROL % '{ name: "S" }', "control_input[0].control: 0 controls"),
        (
            CONTROL % '{ name: "S" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }, '
            "{ kind: CONTROL_SEQUENCE_END int32_false_true: [0, 1] } ] }",
            "control_input[0].control: 2 controls",
        ),
        (CONTROL % flag("S", "START", "int32_false_true: [ 1 ]"), "control[0].int32_false_true: [1]: give exactly 2"),
        (CONTROL % flag("S", "START", "fp32_false_true: [ 0, 1, 2 ]"), "control[0].fp32_false_true: [0.0, 1.0, 2.0]"),
        (CONTROL % flag("S", "START", ""), "control[0]: CONTROL_SEQUENCE_START of 'S' sets []"),
        (
            CONTROL % flag("S", "END", "int32_false_true: [0, 1] bool_false_true: [false, true]"),
            "sets ['int32_false_true', 'bool_false_true']",
        ),
        (
            CONTROL % flag("S", "READY", "int32_false_true: [0, 1] data_type: TYPE_INT32"),
            "control[0].data_type: TYPE_INT32: CONTROL_SEQUENCE_READY takes false/true values",
        ),
        (
            CONTROL % flag("C", "CORRID", "data_type: TYPE_FP32"),
            "control[0].data_type: TYPE_FP32 for CONTROL_SEQUENCE_CORRID",
        ),
        (CONTROL % flag("C", "CORRID", ""), "control[0].data_type: TYPE_INVALID"),
        (
            CONTROL % flag("C", "CORRID", "int32_false_true: [0, 1]"),
            "control[0].int32_false_true: [0, 1]: CONTROL_SEQUENCE_CORRID",
        ),
        (CONTROL % '{ name: "S" control [ { kind: 9 int32_false_true: [0, 1] } ] }', "control[0].kind: 9 is not"),
        (
            CONTROL % f"{flag('A', 'START')}, {flag('B', 'START')}",
            "control_input[1].control[0].kind: CONTROL_SEQUENCE_START is already on 'A'",
        ),
        (CONTROL % f"{flag('A', 'START')}, {flag('A', 'END')}", "control_input[1].name: 'A' is already"),
        (
            f"sequence_batching {{ control_input [ {flag('I', 'START')} ] "
            'state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 dims: [1] } ] }',
            "state[0].input_name: 'I' is already a control or state input",
        ),
        ('sequence_batching { state [ { output_name: "O" data_type: TYPE_INT32 } ] }', "state[0].input_name: missing"),
        ('sequence_batching { state [ { input_name: "I" data_type: TYPE_INT32 } ] }', "state[0].output_name: missing"),
        ('sequence_batching { state [ { input_name: "I" output_name: "O" } ] }', "state[0].data_type: missing"),
        (STATE_WITH.replace("[ 2 ]", "[ 0 ]") % "", "state[0].dims: [0] for state 'I'"),
        (STATE_WITH.replace("[ 2 ]", "[ -2 ]") % "", "state[0].dims: [-2]"),
        (
            'sequence_batching { state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 },'
            ' { input_name: "I" output_name: "P" data_type: TYPE_INT32 } ] }',
            "state[1].input_name: 'I'",
        ),
        (
            'sequence_batching { state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 },'
            ' { input_name: "J" output_name: "O" data_type: TYPE_INT32 } ] }',
            "state[1].output_name: 'O' is already",
        ),
        (
            STATE_WITH % 'initial_state [ { name: "a" data_type: TYPE_INT32 dims: [2] zero_data: true },'
            ' { name: "b" data_type: TYPE_INT32 dims: [2] zero_data: true } ]',
            "state[0].initial_state: 2 given",
        ),
        (
            STATE_WITH % "initial_state { data_type: TYPE_INT32 dims: [2] zero_data: true }",
            "initial_state[0].name: missing",
        ),
        (
            STATE_WITH % 'initial_state { name: "z" data_type: TYPE_FP32 dims: [2] zero_data: true }',
            "initial_state[0].data_type: TYPE_FP32 differs from the state's TYPE_INT32",
        ),
        (
            STATE_WITH.replace("[ 2 ]", "[ -1 ]")
            % 'initial_state { name: "z" data_type: TYPE_INT32 dims: [-1] zero_data: true }',
            "initial_state[0].dims: [-1]: an initial state has fixed dims",
        ),
        (
            STATE_WITH % 'initial_state { name: "z" data_type: TYPE_INT32 dims: [3] zero_data: true }',
            "initial_state[0].dims: [3] do not fit the state's dims [2]",
        ),
        (
            STATE_WITH % 'initial_state { name: "z" data_type: TYPE_INT32 dims: [2, 1] zero_data: true }',
            "initial_state[0].dims: [2, 1] do not fit",
        ),
        (
            STATE_WITH % 'initial_state { name: "z" data_type: TYPE_INT32 dims: [2] }',
            "initial_state[0]: set zero_data or data_file",
        ),
        *(
            (
                STATE_WITH % f'initial_state {{ name: "z" data_type: TYPE_INT32 dims: [2] data_file: "{path}" }}',
                f"initial_state[0].data_file: {path!r} must be a path inside <model>/initial_state/",
            )
            for path in ("../secret", "/etc/passwd", "a/../../b", "")
        ),
        (
            "sequence_batching { iterative_sequence: true }",
            "sequence_batching.iterative_sequence: true is not supported",
        ),
        ("sequence_batching { direct { minimum_slot_utilization: 1.5 } }", "direct.minimum_slot_utilization: 1.5"),
        ("sequence_batching { direct { minimum_slot_utilization: -0.5 } }", "direct.minimum_slot_utilization: -0.5"),
        ("sequence_batching { direct { minimum_slot_utilization: nan } }", "direct.minimum_slot_utilization: nan"),
        (
            "sequence_batching { oldest { max_candidate_sequences: -1 } }",
            "oldest.max_candidate_sequences: -1 is negative",
        ),
        ("sequence_batching { oldest { preferred_batch_size: [ 0 ] } }", "oldest.preferred_batch_size: 0 is below 1"),
        (
            "max_batch_size: 4 sequence_batching { oldest { preferred_batch_size: [ 2, 8 ] } }",
            "oldest.preferred_batch_size: 8 is outside 1..max_batch_size (4)",
        ),
        # Triton's oneof scheduling_choice: one scheduler per model.
        ("dynamic_batching { } sequence_batching { }", "another member of oneof"),
    ],
)
def test_bad_sequence_batching_names_file_and_field(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as error:
        settings_of(tmp_path, text)
    assert str(tmp_path / "m" / "config.pbtxt") in str(error.value)
    assert fragment in str(error.value)


def test_zero_data_false_still_means_zeros_as_in_triton(tmp_path):
    (state,) = sequence_of(
        tmp_path, STATE_WITH % 'initial_state { name: "z" data_type: TYPE_INT32 dims: [2] zero_data: false }'
    ).states
    assert state.initial.data_file == ""


STATES = 'state [ { input_name: "I%d" output_name: "O%d" data_type: TYPE_INT32 dims: [ 1 ] } ]'


@pytest.mark.parametrize(
    "text, field, value, bound",
    [
        (
            "sequence_batching { max_sequence_idle_microseconds: 86400000001 }",
            "sequence_batching.max_sequence_idle_microseconds",
            86400000001,
            86400000000,
        ),
        (
            "sequence_batching { control_input [ %s ] }" % ", ".join(flag(f"C{i}", "START") for i in range(5)),
            "sequence_batching.control_input (inputs)",
            5,
            4,
        ),
        (
            "sequence_batching { %s }" % " ".join(STATES % (i, i) for i in range(257)),
            "sequence_batching.state (states)",
            257,
            256,
        ),
        (
            'sequence_batching { state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 dims: [%s] } ] }'
            % ", ".join(["1"] * 33),
            "sequence_batching.state[0].dims (rank)",
            33,
            32,
        ),
        (
            'sequence_batching { state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 dims: [ -1 ]'
            ' initial_state { name: "z" data_type: TYPE_INT32 dims: [ 67108865 ] zero_data: true } } ] }',
            "sequence_batching.state[0].initial_state[0].dims (elements)",
            67108865,
            67108864,
        ),
        (
            "sequence_batching { oldest { max_candidate_sequences: 65537 } }",
            "sequence_batching.oldest.max_candidate_sequences",
            65537,
            65536,
        ),
        (
            "sequence_batching { oldest { max_queue_delay_microseconds: 60000001 } }",
            "sequence_batching.oldest.max_queue_delay_microseconds",
            60000001,
            60000000,
        ),
        (
            "sequence_batching { direct { max_queue_delay_microseconds: 60000001 } }",
            "sequence_batching.direct.max_queue_delay_microseconds",
            60000001,
            60000000,
        ),
        (
            "sequence_batching { oldest { preferred_batch_size: [ 65537 ] } }",
            "sequence_batching.oldest.preferred_batch_size",
            65537,
            65536,
        ),
        (
            "sequence_batching { oldest { preferred_batch_size: [ %s ] } }" % ", ".join(map(str, range(1, 66))),
            "sequence_batching.oldest.preferred_batch_size (distinct sizes)",
            65,
            64,
        ),
    ],
)
def test_sequence_numbers_are_bounded(tmp_path, text, field, value, bound):
    with pytest.raises(ConfigError) as error:
        settings_of(tmp_path, text)
    assert f"{tmp_path / 'm' / 'config.pbtxt'}: {field}: {value} exceeds onnxserve's limit of {bound}" in str(
        error.value
    )


def test_values_at_the_bounds_load(tmp_path):
    text = (
        "max_batch_size: 65536 sequence_batching { max_sequence_idle_microseconds: 86400000000"
        " oldest { max_candidate_sequences: 65536 max_queue_delay_microseconds: 60000000 preferred_batch_size: [ 65536 ] }"
        ' state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 dims: [ 67108864 ]'
        ' initial_state { name: "z" data_type: TYPE_INT32 dims: [ 67108864 ] zero_data: true } } ] }'
    )
    sequence = sequence_of(tmp_path, text)
    assert sequence.max_candidate_sequences == 65536 and sequence.states[0].initial.dims == (67108864,)


def triton_view(settings: SequenceSettings):
    """`settings` written into our ModelConfig, read back by tritonclient's own ModelConfig class."""
    config = protocol.ModelConfig()
    settings.fill_proto(config.sequence_batching)
    return model_config_pb2.ModelConfig.FromString(config.SerializeToString())


@pytest.mark.parametrize("text", [SIMPLE_SEQUENCE, SIMPLE_DYNA_SEQUENCE, IMPLICIT_STATE])
def test_settings_written_back_read_as_triton_normalizes_the_config(tmp_path, text):
    settings = settings_of(tmp_path, text)
    reported = triton_view(settings.sequence)
    assert reported.WhichOneof("scheduling_choice") == "sequence_batching"
    # What Triton itself reports: the config with its defaults filled in.
    expected = text_format.Parse(text, model_config_pb2.ModelConfig()).sequence_batching
    expected.max_sequence_idle_microseconds = expected.max_sequence_idle_microseconds or DEFAULT_IDLE_US
    if expected.HasField("oldest"):
        expected.oldest.preferred_batch_size.extend([] if expected.oldest.preferred_batch_size else [8])
    else:
        expected.direct.SetInParent()
    assert reported.sequence_batching == expected
    # And our parser reads what it wrote into the same settings.
    again = protocol.ModelConfig.FromString(reported.SerializeToString())
    assert (
        sequence_config.sequence_settings(again, settings.sequence.where, settings.max_batch_size) == settings.sequence
    )


def test_written_back_from_a_file_and_with_other_flag_types():
    settings = SequenceSettings(
        where="w",
        controls=(ControlInput("S", START, "FP32", 0.0, 1.0), ControlInput("E", END, "BOOL", False, True)),
        states=(StateSpec("I", "O", "FP16", (-1, 2), InitialState("f", "FP16", (3, 2), "s.bin")),),
        minimum_slot_utilization=0.25,
        max_queue_delay_us=7,
    )
    reported = triton_view(settings).sequence_batching
    assert list(reported.control_input[0].control[0].fp32_false_true) == [0.0, 1.0]
    assert list(reported.control_input[1].control[0].bool_false_true) == [False, True]
    assert reported.state[0].initial_state[0].data_file == "s.bin"
    assert reported.state[0].initial_state[0].WhichOneof("state_data") == "data_file"
    assert (reported.direct.minimum_slot_utilization, reported.direct.max_queue_delay_microseconds) == (0.25, 7)
    again = protocol.ModelConfig.FromString(triton_view(settings).SerializeToString())
    assert sequence_config.sequence_settings(again, "w", 0) == settings


def test_get_model_config_reports_sequence_batching_instead_of_dynamic_batching(tmp_path):
    settings = settings_of(tmp_path, IMPLICIT_STATE)
    choice = SimpleNamespace(intra_op_threads=1, allow_spinning=False, inline_run_below_us=0, measured=())
    pool = SimpleNamespace(
        device="cpu",
        instance_count=1,
        provider="CPUExecutionProvider",
        in_use=[SimpleNamespace(providers=[])],
        choice=choice,
        io_binding=False,
    )
    model = SimpleNamespace(name="m", settings=settings, pool=pool)
    config = model_config_pb2.ModelConfig.FromString(model_config_proto(model).SerializeToString())
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert config.sequence_batching.state[0].initial_state[0].name == "zeros"
    assert [c.name for c in config.sequence_batching.control_input] == ["START", "READY"]
    plain = dataclasses.replace(settings, sequence=None)
    model.settings = plain
    assert model_config_proto(model).WhichOneof("scheduling_choice") == "dynamic_batching"


@pytest.mark.parametrize("first", ["server.models.sequence_config", "server.models.model_config"])
def test_the_two_modules_import_in_either_order(first):
    probe = f"import {first}; from server.models import model_config, sequence_config; print(model_config.ModelSettings('m', 's').sequence)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
