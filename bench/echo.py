"""The floor of any Python gRPC server on this machine: a bare grpc.aio server that answers
ModelInfer and ModelStreamInfer with prebuilt response bytes, without decoding the request or
running a model.

    python -m bench.echo MODEL.onnx --port 8001

It answers ModelMetadata from the ONNX graph (read once at start) so that a load generator can
build its request, and each inference call with the ModelInferResponse a server would send for
one row of that model. Stream answers come back in order and without the request's id: the load
generator reads them with `--stream-protocol mlserver`.
"""

import argparse
import asyncio
import signal
import sys

import grpc
import numpy as np
import onnxruntime as ort

from server import protocol
from server.engine.runtime import graph_specs
from server.tensors import DATATYPES

READY = "echo ready on port"


def metadata(model_path: str) -> tuple[bytes, bytes]:
    """(ModelMetadataResponse, ModelInferResponse for one row) as serialized bytes."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    inputs, outputs = graph_specs(session.get_inputs(), model_path), graph_specs(session.get_outputs(), model_path)
    described = protocol.ModelMetadataResponse(name="model", versions=["1"], platform="onnxruntime_onnx")
    for spec in inputs:
        described.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    answer = protocol.ModelInferResponse(model_name="model", model_version="1")
    for spec in outputs:
        described.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        shape = [1 if dim == -1 else dim for dim in spec.shape]
        answer.outputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        answer.raw_output_contents.append(np.zeros(shape, DATATYPES[spec.datatype].numpy).tobytes())
    return described.SerializeToString(), answer.SerializeToString()


def handler(described: bytes, answer: bytes) -> grpc.GenericRpcHandler:
    stream_answer = protocol.response_class("ModelStreamInfer")(
        infer_response=protocol.ModelInferResponse.FromString(answer)
    ).SerializeToString()

    async def model_metadata(request: bytes, context) -> bytes:
        return described

    async def model_infer(request: bytes, context) -> bytes:
        return answer

    async def model_stream_infer(requests, context):
        async for _ in requests:
            yield stream_answer

    return grpc.method_handlers_generic_handler(
        protocol.SERVICE_NAME,
        {
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(model_metadata),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer),
        },
    )


async def serve(model_path: str, address: str, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(*metadata(model_path)),))
    bound = server.add_insecure_port(f"{address}:{port}")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print(f"{READY} {bound}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX file whose metadata and output shapes to answer with")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model, args.address, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
