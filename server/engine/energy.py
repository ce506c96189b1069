"""GPU energy counters read off the event loop. The cost ledger needs a device's energy at every
batch start and end; an NVML call there would be a blocking driver call per batch on the loop. So
one thread samples each counter every SAMPLE_SECONDS, and the ledger reads the latest sample,
which costs a dictionary lookup. Energy is then split between batches at the sampling resolution;
per device, models plus idle still add up to the counter's total."""

import logging
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

Meter = Callable[[], float]
SAMPLE_SECONDS = 0.02  # NVML's energy counter itself moves in steps of about this size


class SampledMeters:
    def __init__(self, meters: Mapping[str, Meter], interval: float = SAMPLE_SECONDS) -> None:
        self._meters, self._latest = {}, {}
        for name, meter in meters.items():  # one blocking read each, at start
            try:
                self._latest[name] = meter()
            except Exception as err:  # noqa: BLE001 - NVML said no: this device's energy is not measured
                log.warning("energy counter of %s cannot be read (%s): its energy is not measured", name, err)
                continue
            self._meters[name] = meter
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), name="energy-sampler", daemon=True)
        if self._meters:
            self._thread.start()

    @property
    def devices(self) -> list[str]:
        """The devices whose counters could be read."""
        return list(self._meters)

    def meter(self, name: str) -> Meter:
        """A reading that never blocks: the latest sample, in joules."""
        return lambda: self._latest[name]

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for name, meter in self._meters.items():
                try:
                    self._latest[name] = max(self._latest[name], meter())  # a counter never goes back
                except Exception as err:  # noqa: BLE001 - a driver hiccup: keep the last sample, say so once
                    if name not in self._failed:
                        self._failed.add(name)
                        log.warning("energy counter of %s failed (%s): its energy stays at the last reading", name, err)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
