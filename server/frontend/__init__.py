"""The front end: where a request arrives and its answer leaves.

Owns the transports (gRPC in grpc_service, REST in http_service, the /metrics listener), their
codecs (wire bytes <-> the engine's DecodedRequest and back), the bounds on what one request or
connection may hold, TLS, API keys and the caller's tenant, and the table from domain errors to
gRPC and HTTP status codes.

May import: the shared modules at the top of `server` (config, errors, protocol, tensors,
bytes_codec), `server.engine`'s request API (InferenceCore, Call), `server.models` for names,
model control and what the server says about its models, and `server.observe`. Nothing in the
engine, the models or the observers imports it: the front end is what a second process will run.
"""
