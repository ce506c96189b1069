"""GpuReader and GpuCollector against a stand-in for NVML (no GPU driver runs here):
readings a GPU supports become series; the ones it does not are absent, never zero."""

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.observe.metrics import GpuCollector, GpuReader


class StandInNvml:
    """The few pynvml calls the reader makes; handle 1 has no energy counter (as on older GPUs)."""

    class NVMLError(Exception):
        pass

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H200" if handle == 0 else "Tesla T4"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=2 * 2**30, total=141 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_500  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return 9_000_000  # millijoules


def scrape(reader: GpuReader) -> dict:
    registry = CollectorRegistry()
    registry.register(GpuCollector(reader))
    text = generate_latest(registry).decode()
    return {(s.name, s.labels["device"]): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_readings_become_series_in_base_units():
    reader = GpuReader(StandInNvml(), {"cuda:0": 0, "cuda:1": 1})
    samples = scrape(reader)
    assert samples[("onnxserve_gpu_utilization_ratio", "cuda:0")] == 0.37
    assert samples[("onnxserve_gpu_memory_used_bytes", "cuda:0")] == 2 * 2**30
    assert samples[("onnxserve_gpu_memory_total_bytes", "cuda:1")] == 141 * 2**30
    assert samples[("onnxserve_gpu_power_watts", "cuda:1")] == 250.5
    assert samples[("onnxserve_gpu_energy_joules_total", "cuda:0")] == 9000.0
    assert ("onnxserve_gpu_energy_joules_total", "cuda:1") not in samples  # unsupported: absent, not 0
    assert reader.names() == {"cuda:0": "NVIDIA H200", "cuda:1": "Tesla T4"}


def test_energy_meter_only_where_the_gpu_counts_energy():
    reader = GpuReader(StandInNvml(), {"cuda:0": 0, "cuda:1": 1})
    assert reader.energy_meter("cuda:0")() == 9000.0
    assert reader.energy_meter("cuda:1") is None
