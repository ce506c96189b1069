"""The few KServe v2 gRPC calls the GPU check makes, with onnxserve's own message classes
(server/protocol.py): a model's configuration, one inference with raw contents, the repository
index. No tritonclient, which the lent GPU machine does not have."""

from __future__ import annotations

import grpc
import numpy as np

from server import protocol
from server.tensors import DATATYPES

WIRE_TYPES = {d.numpy: d.wire for d in DATATYPES.values() if d.numpy is not None}


class Client:
    """A blocking client of one server; each call has its own deadline."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(url)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def call(self, method: str, request):
        return protocol.unary(self.channel, method)(request, timeout=self.timeout)

    def model_config(self, model: str):
        return self.call("ModelConfig", protocol.request_class("ModelConfig")(name=model)).config

    def parameters(self, model: str) -> dict[str, str]:
        """ModelConfig's parameters (the settings and provider in force), as strings."""
        return {key: value.string_value for key, value in self.model_config(model).parameters.items()}

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One ModelInfer call with raw input contents; the outputs decoded from raw output contents."""
        request = protocol.ModelInferRequest(model_name=model)
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            request.inputs.add(name=name, datatype=WIRE_TYPES[array.dtype], shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
        response = self.call("ModelInfer", request)
        return {
            tensor.name: np.frombuffer(raw, dtype=DATATYPES[tensor.datatype].numpy).reshape(tuple(tensor.shape))
            for tensor, raw in zip(response.outputs, response.raw_output_contents)
        }

    def index(self) -> list[dict[str, str]]:
        """Every model version the repository knows, with its state and, for one that failed, why."""
        answer = self.call("RepositoryIndex", protocol.request_class("RepositoryIndex")())
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in answer.models]
