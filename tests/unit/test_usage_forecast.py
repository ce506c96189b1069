"""`onnxserve usage --forecast`, run as a user would, on logs written by the server's own UsageLog
with records at known times and costs: every expected number is worked out by hand from them."""

import datetime
import json
import re
import subprocess
import sys

import pytest

from server.engine.usage_log import FIELDS, UsageLog
from server.tools import usage
from tests.conftest import ROOT

NOW = "2027-03-15T18:00:00Z"  # 18 h into the day: 6 h left; 14 days 18 h into March: 16 days 6 h = 390 h left


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def record(time: str, tenant: str, dollars: float | None, outcome: str = "ok") -> tuple:
    values = dict.fromkeys(FIELDS)
    values.update(
        time=at(time),
        request_id="r",
        tenant=tenant,
        tenant_source="api_key",
        model="m",
        version="1",
        protocol="grpc",
        outcome=outcome,
        rows=1,
        cost_dollars=dollars,
    )
    return tuple(values[name] for name in FIELDS)


def write_log(path, records) -> str:
    log = UsageLog(str(path), fsync_ms=5, max_bytes=0, capacity=len(records) + 1)
    log.open()
    for item in records:
        assert log.reserve()
        log.append(item)
    assert log.close() == 0 and log.written == len(records)
    return str(path)


def every(start: str, end: str, minutes: int, tenant: str, dollars: float) -> list[tuple]:
    """A record of `dollars` every `minutes` from start to end, both included."""
    first, last = datetime.datetime.fromisoformat(start), datetime.datetime.fromisoformat(end)
    count = int((last - first).total_seconds() // (minutes * 60)) + 1
    step = datetime.timedelta(minutes=minutes)
    return [record((first + index * step).isoformat(), tenant, dollars) for index in range(count)]


def onnxserve_usage(*arguments: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "server", "usage", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def two_files(tmp_path) -> list[str]:
    """A rotated file and the current one, as of NOW:

    acme: $0.25 every 15 min from 03-14 00:15 to 03-15 18:00 (168 records, $42, all in March); today
      00:00..18:00 is 73 of them, $18.25; the window (12:00, 18:00] 24 of them, $6 (12:00 itself is out):
      $1/h. Plus $100 one second after NOW: ignored.
    zeta: $5 on 02-28 23:59:59 (last month), $10 on 03-01 00:00:00 (this month), today $0.5 at 09:00, and
      in the window $6 + $5.5 + a timeout that cost $0.5 + a refusal that cost nothing: $12, $2/h.
    young: first record 3 h before NOW: $1.5 at 15:00 and 16:00, $3 at 18:00: $6 over 3 h, $2/h.
    newbie: $2 at 17:20 and $1 at 17:50: 40 minutes of data, too little.
    old: February only; late: only after NOW. Neither is listed.
    """
    rotated = [
        *every("2027-03-14T00:15:00Z", "2027-03-15T09:45:00Z", 15, "acme", 0.25),
        record("2027-02-10T10:00:00Z", "old", 3.0),
        record("2027-02-28T23:59:59Z", "zeta", 5.0),
        record("2027-03-01T00:00:00Z", "zeta", 10.0),
        record("2027-03-15T09:00:00Z", "zeta", 0.5),
    ]
    current = [
        *every("2027-03-15T10:00:00Z", "2027-03-15T18:00:00Z", 15, "acme", 0.25),
        record("2027-03-15T18:00:01Z", "acme", 100.0),
        record("2027-03-15T15:00:00Z", "young", 1.5),
        record("2027-03-15T16:00:00Z", "young", 1.5),
        record("2027-03-15T17:00:00Z", "zeta", 6.0),
        record("2027-03-15T17:20:00Z", "newbie", 2.0),
        record("2027-03-15T17:30:00Z", "zeta", 5.5),
        record("2027-03-15T17:45:00Z", "zeta", 0.5, outcome="timeout"),
        record("2027-03-15T17:50:00Z", "zeta", None, outcome="unavailable"),
        record("2027-03-15T17:50:00Z", "newbie", 1.0),
        record("2027-03-15T18:00:00Z", "young", 3.0),
        record("2027-03-15T19:00:00Z", "late", 50.0),
    ]
    assert len(rotated) == 135 + 4 and len(current) == 33 + 11
    return [write_log(tmp_path / "usage.log.1", rotated), write_log(tmp_path / "usage.log", current)]


def table(text: str) -> list[list[str]]:
    """The table's rows (header first), cells split where two or more spaces are."""
    lines = text.splitlines()
    assert lines[-1].startswith("method: ")
    return [re.split(r" {2,}", line.strip()) for line in lines[1:-1]]


def test_the_table_per_tenant_sorted_by_forecast_end_of_month(two_files):
    out = onnxserve_usage("--forecast", "--now", NOW, *two_files).stdout
    assert out.splitlines()[0] == f"as of {NOW} (181 records up to then, 2 after it ignored)"
    assert table(out) == [
        [
            "tenant",
            "spent today",
            "forecast end of day",
            "spent this month",
            "forecast end of month",
            "rate $/h",
            "over h",
        ],
        ["zeta", "12.5", "24.5", "22.5", "802.5", "2", "6"],  # 12.5 + 2*6; 22.5 + 2*390
        ["young", "6", "18", "6", "786", "2", "3"],  # 6 + 2*6; 6 + 2*390
        ["acme", "18.25", "24.25", "42", "432", "1", "6"],  # 18.25 + 6; 42 + 390
        ["newbie", "3", "-", "3", "-", "too little data", "0.666667"],
    ]
    assert out.splitlines()[-1] == (
        "method: rate = the tenant's dollars over the last 6 h / those hours (or / the hours since its first record, "
        "if later; under 1 h: too little data); forecast = spent so far + rate x hours left in the UTC day or month"
    )


def test_json_has_the_same_numbers_the_method_and_now(two_files):
    report = json.loads(onnxserve_usage("--forecast", "--json", "--now", NOW, *two_files).stdout)
    assert (report["now"], report["window_hours"], report["records"], report["records_after_now"]) == (NOW, 6, 181, 2)
    assert report["method"].startswith("rate = the tenant's dollars over the last 6 h")
    assert list(report["tenants"]) == ["zeta", "young", "acme", "newbie"]
    assert report["tenants"]["zeta"] == {
        "spent_today_dollars": 12.5,
        "forecast_end_of_day_dollars": 24.5,
        "spent_this_month_dollars": 22.5,
        "forecast_end_of_month_dollars": 802.5,
        "rate_dollars_per_hour": 2.0,
        "rate_hours": 6.0,
        "too_little_data": False,
    }
    assert report["tenants"]["acme"]["forecast_end_of_month_dollars"] == 432.0
    assert report["tenants"]["young"]["rate_hours"] == 3.0
    assert report["tenants"]["newbie"] == {
        "spent_today_dollars": 3.0,
        "forecast_end_of_day_dollars": None,
        "spent_this_month_dollars": 3.0,
        "forecast_end_of_month_dollars": None,
        "rate_dollars_per_hour": None,
        "rate_hours": 40 / 60,
        "too_little_data": True,
    }


def test_the_window_sets_the_rate(two_files):
    """Over (16:00, 18:00]: acme 8 records, $2; zeta $12; young only its $3 at 18:00 (16:00 is out)."""
    report = json.loads(
        onnxserve_usage("--forecast", "--forecast-window", "2", "--json", "--now", NOW, *two_files).stdout
    )
    rates = {tenant: (row["rate_dollars_per_hour"], row["rate_hours"]) for tenant, row in report["tenants"].items()}
    assert rates == {"zeta": (6.0, 2.0), "acme": (1.0, 2.0), "young": (1.5, 2.0), "newbie": (None, 40 / 60)}
    assert report["tenants"]["zeta"]["forecast_end_of_day_dollars"] == 12.5 + 6.0 * 6
    assert report["tenants"]["zeta"]["forecast_end_of_month_dollars"] == 22.5 + 6.0 * 390
    assert "over the last 2 h" in report["method"]


@pytest.mark.parametrize(
    "now,hours_left_in_month",
    [
        ("2027-04-01T03:00:00Z", 30 * 24 - 3),  # April: 30 days
        ("2028-01-01T03:00:00Z", 31 * 24 - 3),  # a new year
        ("2028-02-01T03:00:00Z", 29 * 24 - 3),  # February of a leap year
    ],
)
def test_a_month_boundary_starts_the_day_and_the_month_afresh(tmp_path, now, hours_left_in_month):
    """$0.5 every 30 min from 6.5 h before now ($1/h), and $100 7 h before now: today and this month hold
    only the records from 00:00 (00:00, 00:30, ... 03:00: $3.5); the window's rate is $6 / 6 h."""
    start = datetime.datetime.fromisoformat(now) - datetime.timedelta(hours=6.5)
    records = [
        record((start - datetime.timedelta(minutes=30)).isoformat(), "t", 100.0),
        *every(start.isoformat(), now, 30, "t", 0.5),
    ]
    report = json.loads(
        onnxserve_usage("--forecast", "--json", "--now", now, write_log(tmp_path / "u.log", records)).stdout
    )
    assert report["tenants"] == {
        "t": {
            "spent_today_dollars": 3.5,
            "forecast_end_of_day_dollars": 3.5 + 1.0 * 21,
            "spent_this_month_dollars": 3.5,
            "forecast_end_of_month_dollars": 3.5 + 1.0 * hours_left_in_month,
            "rate_dollars_per_hour": 1.0,
            "rate_hours": 6.0,
            "too_little_data": False,
        }
    }


def test_records_after_now_are_ignored(tmp_path):
    """$1 every hour 10:00..20:00; as of 14:00 there are five ($5), over the 4 h since the first: $1.25/h."""
    path = write_log(tmp_path / "u.log", every("2027-06-10T10:00:00Z", "2027-06-10T20:00:00Z", 60, "t", 1.0))
    report = json.loads(onnxserve_usage("--forecast", "--json", "--now", "2027-06-10T14:00:00+00:00", path).stdout)
    assert (report["records"], report["records_after_now"]) == (5, 6)
    row = report["tenants"]["t"]
    assert (row["spent_today_dollars"], row["rate_dollars_per_hour"], row["rate_hours"]) == (5.0, 1.25, 4.0)
    assert row["forecast_end_of_day_dollars"] == 5.0 + 1.25 * 10
    assert row["forecast_end_of_month_dollars"] == 5.0 + 1.25 * (20 * 24 + 10)  # June: 30 days, 9 d 14 h gone


def test_now_defaults_to_the_current_time(tmp_path):
    """A record an hour from now is not counted yet; one two hours ago is."""
    clock = datetime.datetime.now(datetime.UTC)
    future = (clock + datetime.timedelta(hours=1)).isoformat()
    past = (clock - datetime.timedelta(hours=2)).isoformat()
    path = write_log(tmp_path / "u.log", [record(past, "t", 1.0), record(future, "t", 2.0)])
    report = json.loads(onnxserve_usage("--forecast", "--json", path).stdout)
    assert (report["records"], report["records_after_now"]) == (1, 1)
    assert abs(datetime.datetime.fromisoformat(report["now"]) - clock) < datetime.timedelta(seconds=30)
    assert report["tenants"]["t"]["rate_dollars_per_hour"] == pytest.approx(0.5, rel=1e-3)  # $1 over the 2 h since


@pytest.mark.parametrize(
    "arguments",
    [
        ["--forecast", "--format", "csv"],
        ["--forecast", "--now", "yesterday"],
        ["--forecast", "--forecast-window", "0.5"],
        ["--forecast", "--forecast-window", "nan"],
    ],
)
def test_bad_arguments_are_refused(tmp_path, capsys, arguments):
    path = write_log(tmp_path / "u.log", [record(NOW, "t", 1.0)])
    with pytest.raises(SystemExit) as stopped:
        usage.main([*arguments, path])
    assert stopped.value.code == 2 and "onnxserve usage: error" in capsys.readouterr().err
