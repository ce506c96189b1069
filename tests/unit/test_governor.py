"""The tenant limits' arithmetic, with its clocks injected: token buckets with bursts, requests in
flight, spend in calendar windows (and their ends), the spend rebuilt from usage records."""

import datetime

import pytest

from server.engine.governor import Governor, limits_snapshot, window_end, window_start
from server.engine.tenant_limits import parse_limits
from server.errors import TenantRefused


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


class Clocks:
    def __init__(self, wall: str) -> None:
        self.monotonic, self.now = 0.0, at(wall)

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.now += seconds


def governor(text: str, wall: str = "2026-12-31T23:00:00") -> tuple[Governor, Clocks]:
    limits, clocks = parse_limits(text, "limits.yaml"), Clocks(wall)
    return Governor(lambda: limits, lambda: clocks.monotonic, lambda: clocks.now), clocks


def refusal(call) -> TenantRefused:
    with pytest.raises(TenantRefused) as caught:
        call()
    return caught.value


def test_windows_start_and_end_on_utc_calendar_boundaries():
    moment = at("2026-12-31T23:59:30")
    assert window_start("hour", moment) == at("2026-12-31T23:00:00")
    assert window_start("day", moment) == at("2026-12-31T00:00:00")
    assert window_start("month", moment) == at("2026-12-01T00:00:00")
    assert window_end("month", moment) == at("2027-01-01T00:00:00")
    assert window_end("month", at("2028-02-10T00:00:00")) == at("2028-03-01T00:00:00")


def test_a_rate_lets_its_burst_through_then_one_request_per_refill():
    rules, clocks = governor("default: {requests_per_second: 2, request_burst: 3}")
    for _ in range(3):
        rules.admit("t", "t")
        rules.release("t")
    refused = refusal(lambda: rules.admit("t", "t"))
    assert refused.reason == "requests_per_second" and refused.retry_after == pytest.approx(0.5)
    clocks.advance(0.5)
    rules.admit("t", "t")
    assert rules.refused == {("t", "requests_per_second"): 1}


def test_requests_in_flight_are_capped_until_released():
    rules, _ = governor("tenants: {a: {max_in_flight: 2}}")
    rules.admit("a", "a")
    rules.admit("a", "a")
    assert refusal(lambda: rules.admit("a", "a")).reason == "max_in_flight"
    rules.admit("b", "b")  # not limited: the default has no cap
    rules.release("a")
    rules.admit("a", "a")
    assert limits_snapshot(rules)["in_flight"] == [("a", 2), ("b", 1)]


def test_a_budget_refuses_once_spent_and_the_next_window_starts_afresh():
    rules, clocks = governor("default: {budget_dollars: {hour: 1.0, month: 5.0}}")
    rules.charge("t", 0.6)
    rules.admit("t", "t")
    rules.charge("t", 0.5)  # the request admitted below the budget still bills what it cost
    refused = refusal(lambda: rules.admit("t", "t"))
    assert refused.reason == "budget_hour" and refused.retry_after == pytest.approx(3600)
    assert "its budget of $1 this hour is spent" in str(refused)
    clocks.advance(3600)  # a new hour, a new month: 2027-01-01T00:00
    assert rules.spent("t", "hour") == 0.0 and rules.spent("t", "month") == 0.0
    rules.admit("t", "t")


def test_the_spend_of_this_month_is_rebuilt_from_usage_records():
    rules, _ = governor("default: {budget_dollars: {day: 2.0}}")
    records = [
        ("t", at("2026-11-30T23:59:59"), 50.0),  # last month: not counted
        ("t", at("2026-12-30T10:00:00"), 1.0),  # this month, not today
        ("t", at("2026-12-31T09:00:00"), 1.5),
        ("t", at("2026-12-31T22:30:00"), 0.5),
        ("u", at("2026-12-31T22:30:00"), 0.0),  # refused: no cost
    ]
    assert rules.rebuild(records) == 3
    assert (rules.spent("t", "day"), rules.spent("t", "month"), rules.spent("t", "hour")) == (2.0, 3.0, 0.0)
    assert refusal(lambda: rules.admit("t", "t")).reason == "budget_day"


def test_a_row_rate_allows_one_request_bigger_than_its_burst_when_full():
    rules, clocks = governor("default: {rows_per_second: 10, row_burst: 10}")
    rules.admit_rows("t", 25)  # bigger than the burst: let through once the bucket is full
    assert refusal(lambda: rules.admit_rows("t", 1)).reason == "rows_per_second"
    clocks.advance(1.6)  # back above zero: 16 rows of refill against 15 owed
    rules.admit_rows("t", 1)
