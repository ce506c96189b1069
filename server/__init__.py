"""onnxserve: a KServe v2 / Open Inference Protocol server for ONNX models.

A request's way through the package, one way only:

    frontend/   gRPC or REST receives it (grpc_server, grpc_service, http_service); its codec
                decodes it against the model's signature (grpc_codec, http_codec, tensor_codec);
                the caller is authenticated and named a tenant (identity)
    engine/     the core admits it (inference), a batcher queues and batches it (batching),
                onnxruntime runs the batch (runtime, placement), each caller gets its own rows,
                the ledger bills the batch and the usage log records the request (costs, usage_log)
    frontend/   its codec encodes the answer, the transport sends it
    observe/    events, metrics and statistics watch all of it and never steer it
    models/     what serves: the repository, config.pbtxt, loading and warm-up, model control

Shared by every room: config and config_checks (the server's settings; config_checks bounds the
default batch and queue sizes as models/model_limits bounds config.pbtxt's), errors, protocol and
protos_generated (the v2 messages), tensors (datatypes, signatures, the decoded request a front
end hands the engine), bytes_codec, processes (titles and heap), followed_file (files re-read while
serving), cuda_runtime (libcudart's few calls). At the top too: app (the composition root: wiring only),
shutdown (the ordered stop), frontends (the front-end processes of --frontends N), __main__
(`onnxserve`). Beside the server, imported by none of the serving code: tune/ (onnxserve-tune)
and tools/ (health probe, usage totals, GPU report, load generator, launcher, /metrics reader).

Each room's __init__ says what it owns and what it may import; tests/unit/test_layout.py checks it.
"""
