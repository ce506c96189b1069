"""The engine: a decoded request in; its own rows, cost and timing out.

Owns the inference core (inference: admit, resolve, account, settle; call: a request's record),
the per-model batchers and their queues (batching, queued, fair_share), sequences and their state
(sequences, sequence_state, device_state), tenant limits (tenant_limits, governor), the onnxruntime sessions (runtime,
binding, placement, providers, cuda_libraries, run_peak; cpus, the cores they may use),
calibration at load, and the bill: the cost ledger (costs), GPU energy (energy) and the usage
log (usage_log).

May import: the shared modules at the top of `server`, `server.models` and `server.observe`
(events it publishes). The engine and the models are one process's two halves and import each
other: the execution pieces read a model's typed settings (models.model_config), the core asks
the repository which version answers, and loading builds a version from the execution pieces.
Never the front end, the tuner or the tools.
"""
