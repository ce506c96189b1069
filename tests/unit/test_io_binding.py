"""IO binding, the GPU's run path, exercised on the CPU (onnxruntime binds CPU OrtValues too):
for every datatype it can bind and every batch size, the outputs equal session.run's."""

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from server.engine.binding import FixedBinding
from server.engine.runtime import InstancePool
from server.errors import ConfigError
from server.models.model_config import SessionSettings
from tests import onnx_models
from tests.integration.test_protocol import DATATYPES, sample

BINDABLE = [datatype for datatype in DATATYPES if datatype != "BYTES"]
MAX_BATCH = 8


def pool(tmp_path, model, io_binding) -> InstancePool:
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    settings = SessionSettings(intra_op_threads=1, inline_run_below_us=0, io_binding=io_binding)
    return InstancePool(path, settings, "model 'm' version 1")


@pytest.mark.parametrize("datatype", BINDABLE)
def test_bound_runs_equal_session_run_for_every_batch_size(tmp_path, datatype):
    bound = pool(tmp_path, onnx_models.identity(datatype), True)
    try:
        assert bound.io_binding
        reference = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        for rows in range(1, MAX_BATCH + 1):
            feeds = {"input": sample(datatype, rows)}
            values, _ = bound._runs[0](bound._sessions[0], ["output"], feeds)
            expected = reference.run(["output"], feeds)[0]
            assert values[0].dtype == expected.dtype and values[0].shape == (rows, 3)
            np.testing.assert_array_equal(values[0], expected)
    finally:
        bound.close()


def test_bound_runs_through_the_pool_with_output_subsets(tmp_path):
    bound = pool(tmp_path, onnx_models.two_in_two_out(), True)
    try:
        a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((3, 2), np.float32)
        count = np.array([[1], [2], [3]], np.int64)
        feeds = {"a": a, "b": b[:, ::-1], "count": count}  # a strided view: bound after a contiguous copy

        async def run():
            return await bound.run(feeds, ["difference", "count_out"], 0)

        outputs = asyncio.run(run())
        np.testing.assert_array_equal(outputs["difference"], a - 1)
        np.testing.assert_array_equal(outputs["count_out"], count)
    finally:
        bound.close()


def test_cpu_instances_use_session_run_unless_asked_and_strings_cannot_bind(tmp_path):
    plain = pool(tmp_path, onnx_models.add_one(), None)
    assert not plain.io_binding  # measured: binding costs about 3 us more per batch on the CPU
    plain.close()
    with pytest.raises(
        ConfigError, match=r"parameters\['io_binding'\]: onnxruntime cannot bind string tensors \(input, output\)"
    ):
        pool(tmp_path, onnx_models.identity("BYTES"), True)
    strings = pool(tmp_path, onnx_models.identity("BYTES"), None)
    assert not strings.io_binding
    strings.close()


def test_fixed_shape_models_bind_once_at_fixed_addresses(tmp_path):
    fixed = pool(tmp_path, onnx_models.add_one(shape=(2, 4)), True)
    try:
        run = fixed._runs[0]
        assert isinstance(run, FixedBinding)
        addresses = {name: value.data_ptr() for name, value in run.inputs.items()}
        answers = []
        for k in range(5):
            values, _ = run(fixed._sessions[0], ["y"], {"x": np.full((2, 4), k, np.float32)})
            answers.append(values[0])
        assert {name: value.data_ptr() for name, value in run.inputs.items()} == addresses
        for k, value in enumerate(answers):  # each batch's answer is its own, not the buffer's latest
            np.testing.assert_array_equal(value, np.full((2, 4), k + 1, np.float32))
    finally:
        fixed.close()
