"""Cost ledger: device prices, and device time and energy apportioned to batches,
models and requests.

At every instant a device's price is split equally between the batches running on
it; with none running it accrues as idle cost. So, per device, the sum of the models'
costs plus the idle cost is price x time, by construction. Energy read from a meter
(NVML's total-energy counter) is split the same way. A batch's cost is split between
its requests by rows.
"""

import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from server.observe.events import BatchExecuted, BatchStarted, ModelStateChanged

log = logging.getLogger(__name__)

# AWS us-east-1 on-demand prices in US dollars per hour for one device, keyed by a
# word of the name NVML reports, most specific first. Per-GPU figures are an
# instance's price divided by its GPUs, so they carry the host's share.
# Instance, source and date of each: README, "Cost per inference".
GPU_PRICE_TABLE: tuple[tuple[str, float], ...] = (
    ("H200", 7.912),  # p5en.48xlarge / 8
    ("H100", 6.88),  # p5.48xlarge / 8
    ("A100-SXM4-80GB", 3.4309),  # p4de.24xlarge / 8
    ("A100 80GB", 3.4309),
    ("A100", 2.7447),  # p4d.24xlarge / 8 (40 GB)
    ("L40S", 1.861),  # g6e.xlarge
    ("A10G", 1.006),  # g5.xlarge
    ("L4", 0.8048),  # g6.xlarge
    ("T4", 0.526),  # g4dn.xlarge
    ("V100", 3.06),  # p3.2xlarge
)
# One vCPU-hour: AWS c7i.large (2 vCPU) on demand, us-east-1, $0.08925 / 2.
CPU_DOLLARS_PER_CORE_HOUR = 0.0446

Meter = Callable[[], float]
"""A device's total energy counter in joules (monotonic)."""


@dataclass(frozen=True, slots=True)
class DevicePrice:
    dollars_per_hour: float
    source: str  # flag, env, table, default (CPU cores x per-core price), included, unknown


def table_price(gpu_name: str) -> float | None:
    """Whole words only: "L4" must not price an "L40S", nor "H200" a "GH200"."""
    for fragment, price in GPU_PRICE_TABLE:
        if re.search(rf"\b{re.escape(fragment)}\b", gpu_name, re.IGNORECASE):
            return price
    return None


def resolve_prices(
    configured: Mapping[str, tuple[float, str]], gpu_names: Mapping[str, str], cpu_cores: int
) -> dict[str, DevicePrice]:
    """Price of "cpu" and of every visible GPU: configured, else the table, else defaults.

    On a GPU host the table's per-GPU price already carries the host, so "cpu" is
    priced 0 ("included") unless configured.
    """
    prices = {device: DevicePrice(price, source) for device, (price, source) in configured.items()}
    for device, name in gpu_names.items():
        if device in prices:
            continue
        found = table_price(name)
        if found is None:
            log.warning(
                "no default price for GPU %r (%s): its cost counts as 0; set --device-price %s=DOLLARS_PER_HOUR",
                name,
                device,
                device,
            )
            prices[device] = DevicePrice(0.0, "unknown")
        else:
            prices[device] = DevicePrice(found, "table")
    if "cpu" not in prices:
        if gpu_names:
            prices["cpu"] = DevicePrice(0.0, "included")
        else:
            prices["cpu"] = DevicePrice(round(CPU_DOLLARS_PER_CORE_HOUR * cpu_cores, 6), "default")
    return prices


@dataclass(frozen=True, slots=True)
class Share:
    """What one request's rows of a batch cost."""

    device: str
    dollars: float
    joules: float | None  # None where the device has no energy meter


@dataclass(frozen=True, slots=True)
class DeviceAccount:
    device: str
    price: DevicePrice
    seconds: float  # device time accounted since the ledger started
    idle_dollars: float
    idle_joules: float | None


@dataclass(frozen=True, slots=True)
class ModelAccount:
    model: str
    version: str
    device: str
    dollars: float
    joules: float | None


@dataclass(frozen=True, slots=True)
class TenantAccount:
    tenant: str
    model: str
    version: str
    device: str
    dollars: float
    joules: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    devices: tuple[DeviceAccount, ...]
    models: tuple[ModelAccount, ...]
    tenants: tuple[TenantAccount, ...] = ()


@dataclass(eq=False, slots=True)
class _Running:
    totals: list  # [dollars, joules] of the batch's model version on this device
    tenants: tuple  # (tenant account's key, its [dollars, joules], its fraction of the batch's rows)
    dollars: float = 0.0
    joules: float = 0.0


@dataclass(eq=False)
class _Device:
    name: str
    price: DevicePrice
    meter: Meter | None
    since: float
    energy_mark: float = 0.0
    seconds: float = 0.0
    idle_dollars: float = 0.0
    idle_joules: float = 0.0
    running: dict[int, _Running] = field(default_factory=dict)


@dataclass(slots=True)
class _BatchCost:
    device: str
    dollars: float
    joules: float | None
    rows: int
    unsettled: int  # rows whose requests have not settled yet


class CostLedger:
    """Observer of BatchStarted/BatchExecuted; read by /metrics (snapshot) and by the
    service (share of a finished batch). Thread-safe: scrapes come from another thread."""

    def __init__(
        self,
        prices: Mapping[str, DevicePrice],
        meters: Mapping[str, Meter] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        remembered_batches: int = 1_000_000,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._meters = dict(meters or {})
        self._devices: dict[str, _Device] = {}
        self._models: dict[tuple[str, str, str], list] = {}
        self._tenants: dict[tuple[str, str, str, str], list] = {}  # (tenant, model, version, device)
        self._finished: collections.OrderedDict[int, _BatchCost] = collections.OrderedDict()
        self._remembered = remembered_batches
        for device, price in prices.items():
            self._add_device(device, price)

    def _add_device(self, name: str, price: DevicePrice) -> _Device:
        meter = self._meters.get(name)
        device = _Device(name, price, meter, self._clock(), meter() if meter else 0.0)
        self._devices[name] = device
        return device

    def _device(self, name: str) -> _Device:
        device = self._devices.get(name)
        if device is None:  # a placement the start-up scan did not see
            log.warning("device %s has no price: its batches count as 0 dollars", name)
            device = self._add_device(name, DevicePrice(0.0, "unknown"))
        return device

    # --- observer -----------------------------------------------------------------------------

    def observe(self, event: object) -> None:
        if isinstance(event, BatchStarted):
            self._started(event)
        elif isinstance(event, BatchExecuted):
            self._finished_batch(event)
        elif isinstance(event, ModelStateChanged) and event.ready:
            self._serving(event)

    def _serving(self, event: ModelStateChanged) -> None:
        """The version's cost series exist at 0 from the start, so rate() counts its first batches."""
        with self._lock:
            for name in event.devices:
                self._accrue(self._device(name), self._clock())
                self._models.setdefault((event.model, event.version, name), [0.0, 0.0])

    def _started(self, event: BatchStarted) -> None:
        with self._lock:
            device = self._device(event.device)
            self._accrue(device, event.started)
            totals = self._models.setdefault((event.model, event.version, event.device), [0.0, 0.0])
            rows = sum(count for _, count in event.tenants)
            keys = [(tenant, event.model, event.version, event.device) for tenant, _ in event.tenants]
            tenants = tuple(
                (key, self._tenants.setdefault(key, [0.0, 0.0]), count / rows)
                for key, (_, count) in zip(keys, event.tenants)
            )
            device.running[event.batch_id] = _Running(totals, tenants)

    def _finished_batch(self, event: BatchExecuted) -> None:
        with self._lock:
            device = self._device(event.device)
            self._accrue(device, event.finished)
            running = device.running.pop(event.batch_id, None)
            if running is None:
                return
            for _, totals, fraction in running.tenants:
                totals[0] += running.dollars * fraction
                totals[1] += running.joules * fraction
            joules = running.joules if device.meter else None
            self._finished[event.batch_id] = _BatchCost(device.name, running.dollars, joules, event.rows, event.rows)
            if len(self._finished) > self._remembered:  # only if requests fail to settle: a leak guard
                forgotten, _ = self._finished.popitem(last=False)
                log.error("cost of batch %d was never settled by its requests; forgotten", forgotten)

    def _accrue(self, device: _Device, now: float) -> None:
        """Split the device's price (and energy) since the last event between the batches running."""
        now = max(now, device.since)  # a scrape may have accrued past an event's own timestamp
        dollars = (now - device.since) * device.price.dollars_per_hour / 3600
        joules = 0.0
        if device.meter:
            reading = device.meter()
            joules, device.energy_mark = max(0.0, reading - device.energy_mark), reading
        device.seconds += now - device.since
        device.since = now
        if not device.running:
            device.idle_dollars += dollars
            device.idle_joules += joules
            return
        dollars /= len(device.running)
        joules /= len(device.running)
        for running in device.running.values():
            running.dollars += dollars
            running.joules += joules
            running.totals[0] += dollars
            running.totals[1] += joules

    # --- readers ------------------------------------------------------------------------------

    def share(self, batch_id: int, rows: int) -> Share | None:
        """The cost of `rows` of a finished batch (None if it is unknown), without settling them."""
        with self._lock:
            cost = self._finished.get(batch_id)
        return None if cost is None else _share(cost, rows)

    def settle(self, batch_id: int, rows: int) -> Share | None:
        """The cost of one request's `rows` of a finished batch, which each request settles once,
        when it ends; the batch is forgotten once all its rows are settled."""
        with self._lock:
            cost = self._finished.get(batch_id)
            if cost is None:
                return None
            cost.unsettled -= rows
            if cost.unsettled <= 0:
                del self._finished[batch_id]
        return _share(cost, rows)

    def price(self, device: str) -> DevicePrice:
        with self._lock:
            return self._device(device).price

    def snapshot(self) -> Snapshot:
        """Every account, accrued up to now."""
        with self._lock:
            now = self._clock()
            for device in self._devices.values():
                self._accrue(device, now)
            devices = tuple(
                DeviceAccount(d.name, d.price, d.seconds, d.idle_dollars, d.idle_joules if d.meter else None)
                for d in self._devices.values()
            )
            models = tuple(
                ModelAccount(model, version, name, totals[0], totals[1] if self._devices[name].meter else None)
                for (model, version, name), totals in self._models.items()
            )
            tenants = self._tenant_accounts()
        return Snapshot(devices, models, tenants)

    def _tenant_accounts(self) -> tuple[TenantAccount, ...]:
        """Finished batches' shares, plus the running batches' shares so far: at every snapshot the
        tenants of a model version on a device sum to its cost."""
        dollars = {key: totals[0] for key, totals in self._tenants.items()}
        joules = {key: totals[1] for key, totals in self._tenants.items()}
        for device in self._devices.values():
            for running in device.running.values():
                for key, _, fraction in running.tenants:
                    dollars[key] += running.dollars * fraction
                    joules[key] += running.joules * fraction
        return tuple(
            TenantAccount(*key, dollars[key], joules[key] if self._devices[key[3]].meter else None) for key in dollars
        )


def _share(cost: _BatchCost, rows: int) -> Share:
    fraction = rows / cost.rows
    return Share(cost.device, cost.dollars * fraction, None if cost.joules is None else cost.joules * fraction)
