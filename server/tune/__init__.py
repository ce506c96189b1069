"""onnxserve-tune: the cheapest configuration of one model within a p99 latency target.

Owns the search (pure functions over measurements), its time budget, the measurement of one
(configuration, rate) point, the configurations as the server reads them, the server it measures,
the tuner that drives them (typed settings), one tune's run (run) and the report. It talks to the server as any client
does, over gRPC and /metrics, through `server.tools`. Nothing in the server imports it.

May import: the shared modules at the top of `server`, `server.tools`, `server.models` (the
server's own config.pbtxt parser checks every candidate) and `server.observe` (the report names
the GPUs as NVML does).
"""
