"""The front end: where a request arrives and its answer leaves.

Owns the transports, each building and starting itself: gRPC (grpc_server starts it, grpc_service
has the RPC table, the metadata and model-control adapters and the status table, grpc_infer and
grpc_stream the inference paths, grpc_codec and wire_walk the wire) and REST (http_service,
http_codec, http_flow, http_tls), the /metrics listener (metrics_server); tensor decoding and
encoding (tensor_codec); the bounds on what one request or connection may hold (request_limits,
connection_limits, listeners, process_limits); TLS, API keys and the caller's tenant (tls,
identity); restricted API groups (restricted); what the server says about itself (server_info)
and about its models (model_info); Triton's system shared memory (shared_regions, served by
grpc_shared_memory and http_shared_memory); and the Backend, what a transport is handed of the
rest. With --frontends N > 1, a front-end process (process) serves a Backend whose core,
information and control speak to the engine's process over the link (link, link_client, and
link_shm for big tensors), whose engine end (link_server) runs there; such a process imports
neither onnxruntime nor the engine's machinery.

May import, when it runs: the shared modules at the top of `server`; of the engine only a
request's record and answer (engine.call, engine.queued); of the models only the name rules
(models.names); and `server.observe`. The engine's core and model control are named for type
annotations only. model_info alone reads the models' live state (models.repository,
models.model_config), in the engine's process. Nothing in the engine, the models or the observers
imports the front end. tests/unit/test_layout.py checks all of this.
"""
