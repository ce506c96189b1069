"""Sequence state kept on the device, on the CPU's own device through IO binding (as CUDA instances
run): a real session's state output stays an OrtValue, each sequence's rows of it are gathered into
the next batch where they lie, and fresh states from the host join them there."""

import numpy as np
import onnxruntime as ort
import pytest

from server.cuda_runtime import CudaError
from server.engine.binding import bound_run
from server.engine.device_state import DeviceCopies, DeviceRows, Gathered, gather, held, rows_of, to_host
from server.engine.placement import visible_gpus
from server.errors import ExecutionFailed
from tests import sequence_models


@pytest.fixture(scope="module")
def session():
    model = sequence_models.accumulator().SerializeToString()
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def feeds(values: list[int], state) -> dict:
    rows = len(values)
    return {
        "INPUT": np.array(values, dtype=np.int32).reshape(rows, 1),
        "START": np.zeros((rows, 1), dtype=np.int32),
        "STATE_IN": state,
    }


def run(session, values: list[int], state):
    """One batch through IO binding on the CPU, STATE_OUT kept where the provider wrote it."""
    kept, copies = frozenset({"STATE_OUT"}), DeviceCopies("cpu")
    outputs, _ = bound_run("cpu", session, ["OUTPUT", "STATE_OUT"], feeds(values, state), kept, copies)
    return outputs


def test_a_state_output_stays_on_the_device_and_the_next_batch_gathers_its_rows_there(session):
    first, state = run(session, [1, 2, 3], np.zeros((3, 1), dtype=np.int32))
    assert isinstance(first, np.ndarray) and first.ravel().tolist() == [1, 2, 3]
    assert isinstance(state, ort.OrtValue) and state.device_name() == "cpu"
    rows = [held(rows_of(state, index, index + 1)) for index in range(3)]
    assert all(isinstance(part, DeviceRows) and part.shape == (1, 1) for part in rows)
    # Sequences 2 and 0 ride again, in that order, with a new one fresh from START on the host
    fresh = np.full((1, 1), 100, dtype=np.int32)
    gathered = gather([rows[2], fresh, rows[0]])
    assert isinstance(gathered, Gathered) and gathered.shape == (3, 1) and gathered.nbytes == 12
    second, state = run(session, [10, 20, 30], gathered)
    assert second.ravel().tolist() == [13, 120, 31]
    assert to_host(rows_of(state, 1, 3)).ravel().tolist() == [120, 31]


def test_a_batch_of_one_sequence_binds_its_state_as_it_lies(session):
    _, state = run(session, [5], np.zeros((1, 1), dtype=np.int32))
    whole = held(state)  # split_outputs hands a lone request the batch's output itself
    assert whole.whole and whole.host().ravel().tolist() == [5]
    assert Gathered((whole,)).on_device(ort, "cpu", DeviceCopies("cpu"), "STATE_IN") is state
    answer, _ = run(session, [2], gather([whole]))
    assert answer.ravel().tolist() == [7]


def test_host_states_concatenate_on_the_host_as_before():
    parts = [np.ones((1, 2), dtype=np.float32), np.zeros((2, 2), dtype=np.float32)]
    joined = gather(parts)
    assert isinstance(joined, np.ndarray) and joined.shape == (3, 2)
    kept = held(joined[1:2])
    assert kept.base is None  # a copy: the batch's array is not kept alive by one row


def test_states_of_other_shapes_cannot_share_a_batch(session):
    _, state = run(session, [1, 2], np.zeros((2, 1), dtype=np.int32))
    mismatched = Gathered((rows_of(state, 0, 1), np.zeros((1, 3), dtype=np.int32)))
    with pytest.raises(ExecutionFailed, match=r"state 'STATE_IN'.*\[1\] and \[3\]"):
        mismatched.on_device(ort, "cpu", DeviceCopies("cpu"), "STATE_IN")


def test_without_a_gpu_device_copies_fail_naming_the_cuda_runtime():
    if visible_gpus():
        pytest.skip("a GPU is visible: CUDA copies succeed here (the GPU check's sequence_state step runs them)")
    copies = DeviceCopies("cuda:0")
    source, target = np.ones(4, dtype=np.uint8), np.zeros(4, dtype=np.uint8)
    with pytest.raises(CudaError):
        copies.run([(target.ctypes.data, source.ctypes.data, 4)])
