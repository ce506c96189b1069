"""The models: what serves, and changes to it while serving.

Owns the Triton-layout repository, config.pbtxt parsed into typed settings and its bounds,
load-time overrides, loading a version (sessions, settings completed from the graph, warm-up,
its batcher) within a deadline, polling the repository's files, and model control (index, load,
unload) for any transport.

May import: the shared modules at the top of `server`, the engine's execution pieces (runtime,
batching, placement, providers, calibration) that a loaded version is built from, and
`server.observe`. Never the front end, the tuner or the tools.
"""
