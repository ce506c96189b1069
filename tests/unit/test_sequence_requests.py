"""A sequence request's parameters and control inputs, as the engine reads and feeds them."""

import numpy as np
import pytest

from server.engine.sequence_state import control_feeds, parse_sequence
from server.errors import InvalidInput
from server.models.sequence_config import CORRID, END, READY, START, ControlInput, SequenceSettings

LABEL = "model 'm' version 1"


@pytest.mark.parametrize(
    "parameters",
    [{}, {"sequence_id": 0}, {"sequence_id": ""}, {"sequence_id": True}, {"sequence_id": 1.5}],
    ids=["missing", "zero", "empty", "bool", "float"],
)
def test_a_request_without_a_usable_correlation_id_is_refused_as_triton_words_it(parameters):
    with pytest.raises(InvalidInput, match="must specify a non-zero or non-empty correlation ID"):
        parse_sequence(parameters, LABEL)


def test_ids_flags_and_their_bounds():
    assert parse_sequence({"sequence_id": 7, "sequence_start": True}, LABEL) == (7, True, False)
    assert parse_sequence({"sequence_id": "abc", "sequence_end": True}, LABEL) == ("abc", False, True)
    with pytest.raises(InvalidInput, match="outside the unsigned 64-bit range"):
        parse_sequence({"sequence_id": 2**64}, LABEL)
    with pytest.raises(InvalidInput, match="'sequence_start' must be a boolean; got int 1"):
        parse_sequence({"sequence_id": 1, "sequence_start": 1}, LABEL)


def test_controls_are_fed_with_their_configured_values_one_row_each():
    settings = SequenceSettings(
        where="config.pbtxt",
        controls=(
            ControlInput("S", START, "FP32", 0.5, 2.5),
            ControlInput("E", END, "BOOL", False, True),
            ControlInput("R", READY, "INT32", 0, 1),
            ControlInput("C", CORRID, "BYTES"),
        ),
    )
    feeds = control_feeds(settings, 42, True, False, max_batch_size=8)
    assert feeds["S"].dtype == np.float32 and feeds["S"].tolist() == [[2.5]]
    assert feeds["E"].tolist() == [[False]] and feeds["R"].tolist() == [[1]]
    assert feeds["C"].tolist() == [["42"]]
    unbatched = control_feeds(settings, "x", False, True, max_batch_size=0)
    assert unbatched["S"].tolist() == [0.5] and unbatched["E"].tolist() == [True]


def test_a_string_id_cannot_feed_a_numeric_correlation_control():
    settings = SequenceSettings(where="config.pbtxt", controls=(ControlInput("C", CORRID, "INT32"),))
    with pytest.raises(InvalidInput, match="sequence id 'abc' cannot feed control input 'C'"):
        control_feeds(settings, "abc", True, False, 8)
    with pytest.raises(InvalidInput, match="takes integers in"):
        control_feeds(settings, 2**40, True, False, 8)
