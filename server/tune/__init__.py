"""onnxserve-tune: the cheapest configuration of one model within a p99 latency target.

Owns the search (pure functions over measurements), its time budget, the measurement of one
(configuration, rate) point, the configurations as the server reads them, the server it measures,
and the report. It talks to the server as any client does (gRPC, /metrics) through `server.tools`;
nothing in the server imports it.
"""
