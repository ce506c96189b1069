"""Prometheus observer of the data path's events, on an injected registry; cost and
GPU readings collected at scrape time; the /metrics HTTP endpoint."""

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.observe import nvml_devices
from server.observe.events import (
    PHASES,
    REQUEST_OUTCOMES,
    BatchExecuted,
    ModelStateChanged,
    RequestFinished,
    RequestStarted,
)

log = logging.getLogger(__name__)

MODEL_LABELS = ("model", "version")
# From 50 microseconds (a tiny model on CPU) to 30 seconds (a large GPU batch), about 2.5x apart.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
PROTOCOLS = ("grpc", "http")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class MetricsObserver:
    """Counters, histograms and gauges moved only by events."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "onnxserve_requests",
            "Inference requests by outcome and transport (grpc, http)",
            (*MODEL_LABELS, "outcome", "protocol"),
            registry=registry,
        )
        self.inferences = Counter(
            "onnxserve_inferences", "Rows served (a request of N rows counts N)", MODEL_LABELS, registry=registry
        )
        self.batches = Counter("onnxserve_batches", "Successful model executions", MODEL_LABELS, registry=registry)
        self.request_duration = Histogram(
            "onnxserve_request_duration_seconds",
            "Successful ModelInfer calls, from receipt to response, server side",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "onnxserve_queue_duration_seconds",
            "Time each executed request waited for its batch",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "onnxserve_compute_duration_seconds",
            "Per execution: input (gather the batch), infer (onnxruntime), output (split per caller)",
            (*MODEL_LABELS, "phase"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "onnxserve_batch_size", "Rows per execution", MODEL_LABELS, buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge("onnxserve_queue_depth", "Requests waiting", MODEL_LABELS, registry=registry)
        self.inflight = Gauge(
            "onnxserve_inflight_requests",
            "Requests received and not yet answered (queued, running or being encoded)",
            MODEL_LABELS,
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "onnxserve_queue_capacity", "max_queue_size (0 = unbounded)", MODEL_LABELS, registry=registry
        )
        self.model_ready = Gauge(
            "onnxserve_model_ready",
            "1 when the model version serves; provider is the execution provider actually in use",
            (*MODEL_LABELS, "provider"),
            registry=registry,
        )
        self.load_duration = Gauge(
            "onnxserve_model_load_duration_seconds",
            "How long the version's last load took: sessions, calibration and warm-up",
            MODEL_LABELS,
            registry=registry,
        )
        self._providers: dict[tuple[str, str], str] = {}  # the provider each version's ready series names

        self._series: dict[tuple[str, str], VersionSeries] = {}

    def handlers(self) -> dict[type, Callable]:
        """What this observer does with each event type (for EventBus.subscribe)."""
        return {
            BatchExecuted: self._batch,
            RequestStarted: lambda event: self.series(event.model, event.version).inflight.inc(),
            RequestFinished: self._request,
            ModelStateChanged: self._state,
        }

    def series(self, model: str, version: str) -> "VersionSeries":
        """One version's children, looked up once: labels() costs microseconds per call."""
        found = self._series.get((model, version))
        if found is None:
            found = self._series[(model, version)] = VersionSeries.bind(self, model, version)
        return found

    def _state(self, event: ModelStateChanged) -> None:
        key = (event.model, event.version)
        previous = self._providers.get(key)
        if event.ready and previous not in (None, event.provider):  # reloaded onto another provider
            self.model_ready.labels(event.model, event.version, previous).set(0)
        self._providers[key] = event.provider
        self.model_ready.labels(event.model, event.version, event.provider).set(1 if event.ready else 0)
        if event.ready:
            self.load_duration.labels(event.model, event.version).set(event.load_seconds)
            self.queue_capacity.labels(event.model, event.version).set(event.queue_capacity)
            series = self.series(event.model, event.version)  # series exist at 0, so rate() counts the first requests
            if event.queue_depth is not None:  # read at scrape time: the queue changes twice per request
                series.queue_depth.set_function(event.queue_depth)

    def _request(self, event: RequestFinished) -> None:
        series = self.series(event.model, event.version)
        series.inflight.dec()
        series.requests[event.outcome, event.protocol].inc()
        if event.outcome == "ok":
            exemplar = {"trace_id": event.trace_id} if event.trace_id else None
            series.request_duration.observe(event.duration_seconds, exemplar)

    def _batch(self, event: BatchExecuted) -> None:
        series = self.series(event.model, event.version)
        for seconds in event.queue_seconds:
            series.queue_duration.observe(seconds)
        if not event.succeeded:
            return
        series.inferences.inc(event.rows)
        series.batches.inc()
        series.batch_size.observe(event.rows)
        series.compute["input"].observe(event.input_seconds)
        series.compute["infer"].observe(event.infer_seconds)
        series.compute["output"].observe(event.output_seconds)


@dataclass(frozen=True, slots=True)
class VersionSeries:
    requests: dict
    inferences: object
    batches: object
    request_duration: object
    queue_duration: object
    compute: dict
    batch_size: object
    queue_depth: object
    inflight: object

    @classmethod
    def bind(cls, metrics: MetricsObserver, model: str, version: str) -> "VersionSeries":
        labels = (model, version)
        return cls(
            requests={
                (outcome, protocol): metrics.requests.labels(*labels, outcome, protocol)
                for outcome in REQUEST_OUTCOMES
                for protocol in PROTOCOLS
            },
            inferences=metrics.inferences.labels(*labels),
            batches=metrics.batches.labels(*labels),
            request_duration=metrics.request_duration.labels(*labels),
            queue_duration=metrics.queue_duration.labels(*labels),
            compute={phase: metrics.compute_duration.labels(*labels, phase) for phase in PHASES},
            batch_size=metrics.batch_size.labels(*labels),
            queue_depth=metrics.queue_depth.labels(*labels),
            inflight=metrics.inflight.labels(*labels),
        )


class CostCollector(Collector):
    """Reads the cost ledger at scrape time, so idle cost is current to the second."""

    def __init__(self, snapshot: Callable) -> None:
        self._snapshot = snapshot  # CostLedger.snapshot

    def collect(self) -> Iterator:
        snapshot = self._snapshot()
        price = GaugeMetricFamily(
            "onnxserve_device_price_dollars_per_hour",
            "Price of the device and where it came from",
            labels=("device", "source"),
        )
        seconds = CounterMetricFamily(
            "onnxserve_device_seconds",
            "Device time accounted since start (price x this / 3600 = cost + idle cost)",
            labels=("device",),
        )
        idle = CounterMetricFamily(
            "onnxserve_idle_cost_dollars", "Priced device time with no batch running", labels=("device",)
        )
        idle_energy = CounterMetricFamily(
            "onnxserve_idle_energy_joules", "Device energy with no batch running", labels=("device",)
        )
        cost = CounterMetricFamily(
            "onnxserve_cost_dollars",
            "Device cost apportioned to this model's batches",
            labels=(*MODEL_LABELS, "device"),
        )
        energy = CounterMetricFamily(
            "onnxserve_energy_joules",
            "Device energy apportioned to this model's batches",
            labels=(*MODEL_LABELS, "device"),
        )
        tenant_cost = CounterMetricFamily(
            "onnxserve_tenant_cost_dollars",
            "The model's cost split between its tenants by their rows in each batch (sums to onnxserve_cost_dollars)",
            labels=("tenant", *MODEL_LABELS, "device"),
        )
        tenant_energy = CounterMetricFamily(
            "onnxserve_tenant_energy_joules",
            "The model's energy split between its tenants",
            labels=("tenant", *MODEL_LABELS, "device"),
        )
        info = GaugeMetricFamily(
            "onnxserve_device_info",
            "Devices priced; energy: nvml where NVML's energy counter is read, none where energy is not measured",
            labels=("device", "energy"),
        )
        for account in snapshot.devices:
            info.add_metric((account.device, "none" if account.idle_joules is None else "nvml"), 1)
            price.add_metric((account.device, account.price.source), account.price.dollars_per_hour)
            seconds.add_metric((account.device,), account.seconds)
            idle.add_metric((account.device,), account.idle_dollars)
            if account.idle_joules is not None:
                idle_energy.add_metric((account.device,), account.idle_joules)
        for account in snapshot.models:
            cost.add_metric((account.model, account.version, account.device), account.dollars)
            if account.joules is not None:
                energy.add_metric((account.model, account.version, account.device), account.joules)
        for account in snapshot.tenants:
            labels = (account.tenant, account.model, account.version, account.device)
            tenant_cost.add_metric(labels, account.dollars)
            if account.joules is not None:
                tenant_energy.add_metric(labels, account.joules)
        families = (info, price, seconds, idle, idle_energy, cost, energy, tenant_cost, tenant_energy)
        yield from (family for family in families if family.samples)


class GpuReader:
    """NVML handles of the GPUs CUDA sees, keyed by CUDA ordinal; `open()` is None without a
    driver or a visible GPU."""

    def __init__(self, nvml, handles: dict[str, object], memory_handles: Mapping[str, object] | None = None) -> None:
        self._nvml = nvml
        self.handles = handles  # "cuda:N" -> NVML handle of the board (of a MIG instance's parent board)
        self._memory_handles = dict(memory_handles or {})  # "cuda:N" -> its MIG instance: memory is per instance

    @classmethod
    def open(cls, nvml=None, environ: Mapping[str, str] | None = None) -> "GpuReader | None":
        """pynvml and os.environ unless given; call after nvml_devices.pin_cuda_order."""
        try:
            nvml = nvml_devices.start(nvml)
        except nvml_devices.NvmlUnavailable as err:  # no driver or no library: a CPU machine
            log.info("GPU metrics: NVML is not available (%s); no onnxserve_gpu_* series", err)
            return None
        environ = os.environ if environ is None else environ
        try:
            devices = nvml_devices.cuda_devices(nvml, environ)
        except nvml.NVMLError as err:  # a driver that cannot list its GPUs: as good as none
            devices = []
            log.warning("GPU metrics: NVML cannot list the GPUs (%s)", err)
        if not devices:
            nvml.nvmlShutdown()
            visible = environ.get(nvml_devices.VISIBLE_VARIABLE)
            shown = "" if visible is None else f" ({nvml_devices.VISIBLE_VARIABLE}={visible!r})"
            log.info("GPU metrics: CUDA sees no GPU%s; no onnxserve_gpu_* series", shown)
            return None
        for device in devices:  # once, at start: a MIG device's energy over-counts, a pinned order may not hold
            log.info("GPU metrics: %s reads NVML device %s%s", device.name, device.uuid, " (MIG)" if device.mig else "")
            if device.note:
                log.warning("GPU metrics: %s", device.note)
        memory = {device.name: device.instance for device in devices if device.instance is not None}
        return cls(nvml, {device.name: device.handle for device in devices}, memory)

    def names(self) -> dict[str, str]:
        return {
            device: nvml_devices.text(self._nvml.nvmlDeviceGetName(handle)) for device, handle in self.handles.items()
        }

    def energy_meter(self, device: str) -> Callable[[], float] | None:
        """Joules since the driver loaded, or None where the GPU does not count energy."""
        handle = self.handles[device]
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except self._nvml.NVMLError as err:
            log.warning("GPU %s does not report energy (%s): no energy figures for it", device, err)
            return None
        return lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0

    def readings(self, device: str) -> dict[str, float]:
        """Whatever this GPU reports now; a reading it does not support is left out."""
        nvml, handle = self._nvml, self.handles[device]
        memory = self._memory_handles.get(device, handle)
        probes = {
            "utilization": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
            "memory_used": lambda: float(nvml.nvmlDeviceGetMemoryInfo(memory).used),
            "memory_total": lambda: float(nvml.nvmlDeviceGetMemoryInfo(memory).total),
            "power": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "energy": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0,
        }
        values = {}
        for key, probe in probes.items():
            try:
                values[key] = probe()
            except nvml.NVMLError as err:
                log.debug("GPU %s: %s not available: %s", device, key, err)
        return values

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class GpuCollector(Collector):
    """NVML readings at scrape time; a GPU's unsupported readings are absent, never zero."""

    FAMILIES = (
        (
            "utilization",
            GaugeMetricFamily,
            "onnxserve_gpu_utilization_ratio",
            "Time the GPU was busy over NVML's last sample period",
        ),
        ("memory_used", GaugeMetricFamily, "onnxserve_gpu_memory_used_bytes", "GPU memory in use"),
        ("memory_total", GaugeMetricFamily, "onnxserve_gpu_memory_total_bytes", "GPU memory installed"),
        ("power", GaugeMetricFamily, "onnxserve_gpu_power_watts", "GPU power draw"),
        ("energy", CounterMetricFamily, "onnxserve_gpu_energy_joules", "GPU energy since the driver loaded"),
    )

    def __init__(self, reader: GpuReader) -> None:
        self._reader = reader

    def collect(self) -> Iterator:
        readings = {device: self._reader.readings(device) for device in self._reader.handles}
        for key, family_type, name, documentation in self.FAMILIES:
            family = family_type(name, documentation, labels=("device",))
            for device, values in readings.items():
                if key in values:
                    family.add_metric((device,), values[key])
            if family.samples:
                yield family
