"""Programs beside the server: the container health probe (onnxserve-health), the usage log's
totals (onnxserve usage, which server/__main__.py hands on to), the GPU report, the load generator,
the launcher that starts a server as a child process, and the /metrics reader that the tuner, the
tests and the benchmarks share. The serving code imports none of them.

May import: the shared modules at the top of `server`, `server.engine` (the GPU report asks the
providers; the usage totals read the usage log's schema) and `server.observe`.
"""
