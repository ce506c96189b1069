"""The engine: a decoded request in; its own rows, cost and timing out.

Owns the inference core (inference: admit, resolve, account, settle), the per-model batchers and
their queues, the onnxruntime sessions (runtime, binding, placement, providers, the CUDA
libraries), calibration at load, and the bill: the cost ledger, GPU energy and the usage log.

May import: the shared modules at the top of `server`, `server.models` (which version answers)
and `server.observe` (events it publishes). Never the front end, the tuner or the tools.
"""
