"""Serve one ONNX file with NVIDIA PyTriton; runs in bench/.venv-pytriton (see serve.py).

    bench/.venv-pytriton/bin/python bench/pytriton/model.py MODEL.onnx --name mlp
        --grpc-port 8001 --http-port 8000 --max-batch-size 64 --workdir DIR

Triton's C++ front end and dynamic batcher take the requests; its Python backend stub hands
each batch over to this process, where `infer` runs it with onnxruntime. Inputs and outputs
come from the graph: every tensor's first dimension is the batch (PyTriton leaves it out of
the declared shape), other dynamic dimensions are -1. Serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def session(model_path: Path) -> ort.InferenceSession:
    """Sequential execution, one intra-op thread per usable core: onnxserve's raw baseline."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def tensors(nodes) -> list[Tensor]:
    specs = []
    for node in nodes:
        if not node.shape or isinstance(node.shape[0], int):
            raise ValueError(f"'{node.name}' {node.shape}: PyTriton batching needs a dynamic first dimension")
        if node.type not in DTYPES:
            raise ValueError(f"'{node.name}' is {node.type}, which this binding does not map")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape[1:])
        specs.append(Tensor(name=node.name, dtype=DTYPES[node.type], shape=shape))
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    sess = session(args.model)
    output_names = [o.name for o in sess.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, sess.run(output_names, inputs)))

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        allow_metrics=False,  # nothing reads them, and no third port to clash
        log_file=args.workdir / "triton.log",  # else PyTriton keeps all of Triton's output in memory
    )
    # SIGTERM as Ctrl-C: serve() then stops Triton and its stubs and frees their shared memory.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Triton(config=config, workspace=args.workdir / "workspace") as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=tensors(sess.get_inputs()),
            outputs=tensors(sess.get_outputs()),
            config=ModelConfig(max_batch_size=args.max_batch_size),  # default batcher: no queue delay
        )
        triton.serve()


if __name__ == "__main__":
    main()
