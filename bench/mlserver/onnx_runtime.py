"""A plain custom MLServer runtime for one ONNX file: the benchmark's peer.

model-settings.json:

    {"name": "mlp", "implementation": "onnx_runtime.OnnxRuntime",
     "parameters": {"uri": "/abs/path/model.onnx"},
     "max_batch_size": 64, "max_batch_time": 0.001}

This is what an MLServer user would write following MLServer's "custom inference runtime"
docs, on purpose: decode each input with NumpyCodec, run the onnxruntime session, encode
each output with NumpyCodec. No shortcuts around MLServer's codecs or data plane, so the
benchmark measures what MLServer users get. Adaptive batching (max_batch_size and
max_batch_time) is MLServer's own: it concatenates the requests along the first dimension
before `predict` and splits the outputs after, so the model needs a batch first dimension.

Runs in bench/.venv-mlserver (bench/mlserver/setup.sh), never in onnxserve's environment.
The session uses ORT_SEQUENTIAL and ONNX_INTRA_OP_THREADS threads (default 2).
"""

import os
from collections.abc import AsyncIterator

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

THREADS_ENV = "ONNX_INTRA_OP_THREADS"

# onnxruntime's type strings -> KServe v2 datatypes (for the model metadata).
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _metadata(args) -> list[MetadataTensor]:
    return [
        MetadataTensor(
            name=arg.name,
            datatype=_DATATYPES.get(arg.type, "BYTES"),
            shape=[d if isinstance(d, int) else -1 for d in arg.shape],
        )
        for arg in args
    ]


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "2"))
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._inputs = {arg.name: _DATATYPES.get(arg.type) for arg in self._session.get_inputs()}
        self._outputs = [arg.name for arg in self._session.get_outputs()]
        # What ModelMetadata reports: the graph's names, datatypes and shapes (-1 = dynamic).
        self.inputs = _metadata(self._session.get_inputs())
        self.outputs = _metadata(self._session.get_outputs())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for request_input in payload.inputs:
            expected = self._inputs.get(request_input.name)
            if expected is None:
                raise InferenceError(f"unexpected input '{request_input.name}': the model takes {sorted(self._inputs)}")
            if request_input.datatype != expected:
                raise InferenceError(
                    f"input '{request_input.name}' is {request_input.datatype}, the model wants {expected}"
                )
            feeds[request_input.name] = NumpyCodec.decode_input(request_input)
        missing = set(self._inputs) - set(feeds)
        if missing:
            raise InferenceError(f"missing inputs {sorted(missing)}")

        names = [output.name for output in payload.outputs] if payload.outputs else self._outputs
        try:
            results = self._session.run(names, feeds)
        except Exception as error:  # bad shapes, unknown output names: onnxruntime says which
            raise InferenceError(str(error)) from error

        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, array) for name, array in zip(names, results)],
        )

    async def predict_stream(self, payloads: AsyncIterator[InferenceRequest]) -> AsyncIterator[InferenceResponse]:
        """ModelStreamInfer: each request in turn. MLServer's adaptive batching replaces the
        instance's `predict` (and warns that it does not batch streams), so calling `predict`
        here still puts stream requests into its batches, as ModelStreamInfer does in onnxserve."""
        async for payload in payloads:
            yield await self.predict(payload)
