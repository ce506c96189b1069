"""The cost ledger alone, on a clock and an energy counter the test moves by hand."""

import pytest

from server.engine.costs import CostLedger, DevicePrice, resolve_prices, table_price
from server.observe.events import BatchExecuted, BatchStarted, ModelStateChanged

PRICE = DevicePrice(3600.0, "flag")  # one dollar per second keeps the arithmetic readable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.joules = 5000.0  # the counter does not start at zero

    def __call__(self) -> float:
        return self.now

    def meter(self) -> float:
        return self.joules

    def advance(self, seconds: float, watts: float = 0.0) -> None:
        self.now += seconds
        self.joules += seconds * watts


def start(ledger, clock, batch_id, model="a", device="cuda:0"):
    ledger.observe(BatchStarted(model, "1", batch_id, device, clock.now))


def finish(ledger, clock, batch_id, rows, model="a", device="cuda:0"):
    ledger.observe(BatchExecuted(model, "1", batch_id, device, rows, 1, 0, 0.0, clock.now, True))


def accounts(ledger):
    snapshot = ledger.snapshot()
    devices = {account.device: account for account in snapshot.devices}
    models = {(account.model, account.device): account for account in snapshot.models}
    return devices, models


def test_overlapping_batches_split_the_price_and_idle_time_is_idle_cost():
    clock = Clock()
    ledger = CostLedger({"cuda:0": PRICE}, {"cuda:0": clock.meter}, clock=clock)
    clock.advance(2, watts=50)  # idle: $2, 100 J
    start(ledger, clock, 1, "a")
    clock.advance(1, watts=300)  # a alone: $1, 300 J
    start(ledger, clock, 2, "b")
    clock.advance(2, watts=400)  # a and b: $1 and 400 J each
    finish(ledger, clock, 1, rows=4, model="a")
    clock.advance(1, watts=300)  # b alone: $1, 300 J
    finish(ledger, clock, 2, rows=2, model="b")
    clock.advance(3, watts=50)  # idle: $3, 150 J

    devices, models = accounts(ledger)
    assert models[("a", "cuda:0")].dollars == pytest.approx(2.0)
    assert models[("a", "cuda:0")].joules == pytest.approx(700.0)
    assert models[("b", "cuda:0")].dollars == pytest.approx(2.0)
    assert models[("b", "cuda:0")].joules == pytest.approx(700.0)
    assert devices["cuda:0"].idle_dollars == pytest.approx(5.0)
    assert devices["cuda:0"].idle_joules == pytest.approx(250.0)
    assert devices["cuda:0"].seconds == pytest.approx(9.0)
    # Conservation: models + idle = price x time, and energy likewise.
    assert 2.0 + 2.0 + devices["cuda:0"].idle_dollars == pytest.approx(devices["cuda:0"].seconds * 1.0)

    quarter = ledger.share(1, rows=1)
    assert (quarter.device, quarter.dollars, quarter.joules) == ("cuda:0", pytest.approx(0.5), pytest.approx(175.0))


def test_a_running_batch_is_charged_up_to_the_scrape():
    clock = Clock()
    ledger = CostLedger({"cpu": PRICE}, clock=clock)
    start(ledger, clock, 7, device="cpu")
    clock.advance(4)
    devices, models = accounts(ledger)
    assert models[("a", "cpu")].dollars == pytest.approx(4.0)
    assert models[("a", "cpu")].joules is None  # no meter: energy is not measured, not zero
    assert devices["cpu"].idle_dollars == 0.0
    assert ledger.share(7, rows=1) is None  # not finished yet


def test_an_event_stamped_before_a_scrape_keeps_time_monotonic():
    clock = Clock()
    ledger = CostLedger({"cpu": PRICE}, clock=clock)
    clock.advance(1)
    start(ledger, clock, 1, device="cpu")
    clock.advance(2)
    ledger.snapshot()  # accrues to now
    ledger.observe(BatchExecuted("a", "1", 1, "cpu", 1, 1, 0, 0.0, clock.now - 0.5, True))  # stamped earlier
    clock.advance(1)
    devices, models = accounts(ledger)
    assert models[("a", "cpu")].dollars + devices["cpu"].idle_dollars == pytest.approx(devices["cpu"].seconds)
    assert devices["cpu"].seconds == pytest.approx(4.0)


def test_forgotten_batches_have_no_share():
    clock = Clock()
    ledger = CostLedger({"cpu": PRICE}, clock=clock, remembered_batches=2)
    for batch_id in (1, 2, 3):
        start(ledger, clock, batch_id, device="cpu")
        clock.advance(1)
        finish(ledger, clock, batch_id, rows=1, device="cpu")
    assert ledger.share(1, 1) is None
    assert ledger.share(3, 1).dollars == pytest.approx(1.0)


def test_prices_come_from_configuration_then_the_table_then_defaults():
    gpus = {"cuda:0": "NVIDIA H100 80GB HBM3", "cuda:1": "NVIDIA GH200 480GB"}
    prices = resolve_prices({"cuda:0": (2.5, "flag")}, gpus, cpu_cores=8)
    assert prices["cuda:0"] == DevicePrice(2.5, "flag")
    assert prices["cuda:1"] == DevicePrice(0.0, "unknown")  # not in the table: loudly unpriced, not guessed
    assert prices["cpu"] == DevicePrice(0.0, "included")  # the per-GPU price carries the host

    cpu_only = resolve_prices({}, {}, cpu_cores=2)
    assert cpu_only["cpu"].source == "default"
    assert cpu_only["cpu"].dollars_per_hour == pytest.approx(2 * 0.0446)


@pytest.mark.parametrize(
    "name, price",
    [
        ("NVIDIA H200", 7.912),
        ("NVIDIA L40S", 1.861),
        ("NVIDIA L4", 0.8048),
        ("NVIDIA A100-SXM4-80GB", 3.4309),
        ("NVIDIA A100-PCIE-40GB", 2.7447),
        ("Tesla T4", 0.526),
        ("NVIDIA L40", None),
    ],
)
def test_table_matches_whole_words(name, price):
    assert table_price(name) == price


def test_a_serving_model_has_cost_series_before_its_first_batch():
    clock = Clock()
    ledger = CostLedger({"cpu": PRICE}, clock=clock)
    ledger.observe(ModelStateChanged("a", "1", True, "CPUExecutionProvider", devices=("cpu",)))
    _, models = accounts(ledger)
    assert models[("a", "cpu")].dollars == 0.0


def test_tenants_share_each_batch_by_rows_and_sum_to_the_model_at_every_snapshot():
    clock = Clock()
    ledger = CostLedger({"cuda:0": PRICE}, {"cuda:0": clock.meter}, clock=clock)
    ledger.observe(BatchStarted("a", "1", 1, "cuda:0", clock.now, (("t1", 3), ("t2", 1))))
    clock.advance(2, watts=100)  # $2, 200 J: t1 three quarters, t2 one
    mid = {account.tenant: account for account in ledger.snapshot().tenants}
    assert mid["t1"].dollars == pytest.approx(1.5) and mid["t2"].dollars == pytest.approx(0.5)
    assert mid["t1"].joules == pytest.approx(150.0)
    ledger.observe(BatchStarted("a", "1", 2, "cuda:0", clock.now, (("t2", 2),)))
    clock.advance(2, watts=100)  # $1 to each batch
    finish(ledger, clock, 1, rows=4)
    finish(ledger, clock, 2, rows=2)

    snapshot = ledger.snapshot()
    tenants = {account.tenant: account for account in snapshot.tenants}
    assert tenants["t1"].dollars == pytest.approx(2.25)
    assert tenants["t2"].dollars == pytest.approx(0.75 + 1.0)
    assert sum(t.dollars for t in snapshot.tenants) == pytest.approx(snapshot.models[0].dollars, rel=1e-12)
    assert sum(t.joules for t in snapshot.tenants) == pytest.approx(snapshot.models[0].joules, rel=1e-12)


def test_a_batch_is_remembered_until_each_request_settled_its_rows():
    clock = Clock()
    ledger = CostLedger({"cpu": PRICE}, clock=clock)
    ledger.observe(BatchStarted("a", "1", 7, "cpu", clock.now, (("t1", 3), ("t2", 1))))
    clock.advance(4)
    finish(ledger, clock, 7, rows=4, device="cpu")
    assert ledger.share(7, 1).dollars == pytest.approx(1.0)  # a peek settles nothing
    assert ledger.settle(7, 3).dollars == pytest.approx(3.0)
    assert ledger.share(7, 1) is not None
    assert ledger.settle(7, 1).dollars == pytest.approx(1.0) and ledger.settle(7, 1) is None
    assert ledger.price("cpu") == PRICE
