"""Verification only (bench/mlserver/check.py): OnnxRuntime that also records, for every
call MLServer makes to predict(), how many rows the batched request had, one line per call
in the file named by COUNT_BATCHES_FILE. Never used by the benchmark itself."""

import os

from mlserver.types import InferenceRequest, InferenceResponse
from onnx_runtime import OnnxRuntime


class CountingOnnxRuntime(OnnxRuntime):
    def __init__(self, settings) -> None:
        super().__init__(settings)
        self._counts = open(os.environ["COUNT_BATCHES_FILE"], "a", buffering=1)  # noqa: SIM115 - lives with the model

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        self._counts.write(f"{payload.inputs[0].shape[0]}\n")
        return await super().predict(payload)
