"""The observers: what the server tells about itself, never what it does.

Owns the event bus that the data path publishes to, Prometheus metrics (per model, per tenant,
GPU readings), Triton's cumulative statistics, NVML device discovery, and the limit on repeated
log lines. Observers are called by events or at scrape time and never call back into the path.

May import: the shared modules at the top of `server`, prometheus_client and nvidia-ml-py.
"""
