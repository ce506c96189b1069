"""The `outcome` label of a request, one mapping for unary calls, streams and REST alike
(InferenceCore.end): what /metrics, the statistics and the usage log say of how it ended."""

import asyncio

import pytest

from server.engine.call import outcome_of
from server.errors import (
    DeadlineExceeded,
    ExecutionFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
)


@pytest.mark.parametrize(
    "error,outcome",
    [
        (None, "ok"),
        (asyncio.CancelledError(), "cancelled"),
        (InvalidInput("shape"), "invalid"),
        (ModelNotFound("no such model"), "invalid"),
        (Overloaded("queue full"), "rejected"),
        (ModelNotReady("loading"), "rejected"),
        (ShuttingDown("stopping"), "rejected"),
        (DeadlineExceeded("timed out in the queue"), "timeout"),
        (ExecutionFailed("onnxruntime failed"), "error"),
        (RuntimeError("a bug"), "error"),
    ],
)
def test_every_way_a_request_ends_has_one_outcome(error, outcome):
    assert outcome_of(error) == outcome
