"""Programs beside the server, none of which the server imports: the container health probe
(onnxserve-health), the usage log's totals (onnxserve usage), the GPU report, the load generator,
the launcher that starts a server as a child process, and the /metrics reader that the tuner, the
tests and the benchmarks share.
"""
