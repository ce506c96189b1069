"""`onnxserve usage PATH...` (or `python -m server.tools.usage`): totals of usage logs per tenant and per
model, as a table, CSV or JSON. Rotated files (PATH.1, PATH.2, ...) are read when named, e.g.
`onnxserve usage /var/log/onnxserve/usage.log*`; a file named twice counts once.

A torn last line (a crash mid-write) is skipped and reported; any other line that is not a record
is reported as corrupt and makes the exit status 1, after the totals.

`--forecast` prints, instead of the totals, each tenant's spend so far in the current UTC day and
UTC month and a projection of it to the end of each, as of `--now` (ISO-8601 UTC; default the
current time; records after it are ignored). The method, also printed under the table:

- the recent rate is the tenant's dollars per hour over the last `--forecast-window` hours (default
  6): the dollars of its records in (now - window, now], divided by the window's hours, or by the
  hours since its first record when that is later (the span the log covers for it);
- a span under one hour gives no rate: the tenant is shown with "too little data" and no forecast;
- the forecast is spent so far + rate x hours left in the day (or the month).

Every record costs what it says (refused and failed requests usually nothing). A tenant is listed
when it has a record this month or in the window; the table is sorted by forecast end of month,
highest first, tenants with too little data last."""

import argparse
import collections
import csv
import datetime
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from server.engine.usage_log import SCHEMA


@dataclass
class Totals:
    requests: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    inferences: int = 0  # rows of successful requests, as onnxserve_tenant_inferences_total counts
    cost_dollars: float = 0.0
    energy_joules: float | None = None  # None: no record measured any (no GPU energy counter)

    def add(self, record: dict) -> None:
        self.requests += 1
        self.outcomes[record["outcome"]] += 1
        if record["outcome"] == "ok":
            self.inferences += record["rows"]
        self.cost_dollars += record["cost_dollars"] or 0.0
        if record["energy_joules"] is not None:
            self.energy_joules = (self.energy_joules or 0.0) + record["energy_joules"]

    def row(self) -> dict:
        return {
            "requests": self.requests,
            "ok": self.outcomes["ok"],
            "inferences": self.inferences,
            "cost_dollars": self.cost_dollars,
            "energy_joules": self.energy_joules,
        }


@dataclass
class Summary:
    records: int = 0
    torn: list[str] = field(default_factory=list)  # "file:line"
    corrupt: list[str] = field(default_factory=list)
    tenants: dict = field(default_factory=lambda: collections.defaultdict(Totals))
    models: dict = field(default_factory=lambda: collections.defaultdict(Totals))
    tenant_models: dict = field(default_factory=lambda: collections.defaultdict(Totals))

    def add(self, record: dict) -> None:
        self.records += 1
        self.tenants[record["tenant"]].add(record)
        self.models[(record["model"], record["version"])].add(record)
        self.tenant_models[(record["tenant"], record["model"], record["version"])].add(record)


def read(paths: list[str], into: "Summary | Forecast | None" = None) -> "Summary | Forecast":
    """Every record of `paths`, each file once, added to `into` (a new Summary by default)."""
    summary, seen = Summary() if into is None else into, set()
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        _read_file(Path(path), summary)
    return summary


def _read_file(path: Path, summary: Summary) -> None:
    lines = path.read_bytes().split(b"\n")
    last = len(lines) - 1  # after the final newline: b"", unless the last line is torn
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is not None:
            summary.add(record)
        elif number - 1 == last:
            summary.torn.append(f"{path}:{number}")
        else:
            summary.corrupt.append(f"{path}:{number}")


def _record(line: bytes) -> dict | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        return None
    return record


TENANT_COLUMNS = ("tenant",)
MODEL_COLUMNS = ("model", "version")
VALUE_COLUMNS = ("requests", "ok", "inferences", "cost_dollars", "energy_joules")


def _rows(totals: dict, columns: tuple[str, ...], outcomes: bool = False) -> list[dict]:
    rows = []
    for key, total in sorted(totals.items(), key=lambda item: -item[1].cost_dollars):
        key = key if isinstance(key, tuple) else (key,)
        rows.append(
            {**dict(zip(columns, key)), **total.row(), **({"outcomes": dict(total.outcomes)} if outcomes else {})}
        )
    return rows


def render(summary: Summary, form: str) -> str:
    tenants = _rows(summary.tenants, TENANT_COLUMNS)
    models = _rows(summary.models, MODEL_COLUMNS)
    if form == "json":
        detail = _rows(summary.tenant_models, TENANT_COLUMNS + MODEL_COLUMNS, outcomes=True)
        document = {
            "records": summary.records,
            "torn": summary.torn,
            "corrupt": summary.corrupt,
            "tenants": tenants,
            "models": models,
            "tenant_models": detail,
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("by", "tenant", "model", "version", *VALUE_COLUMNS))
        for by, rows in (("tenant", tenants), ("model", models)):
            for row in rows:
                writer.writerow(
                    (
                        by,
                        row.get("tenant", ""),
                        row.get("model", ""),
                        row.get("version", ""),
                        *(
                            "" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                            for c in VALUE_COLUMNS
                        ),
                    )
                )
        return out.getvalue().rstrip("\n")
    return "\n\n".join((_table(tenants, TENANT_COLUMNS), _table(models, MODEL_COLUMNS)))


def _table(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...] = VALUE_COLUMNS) -> str:
    columns = (*keys, *values)
    cells = [columns] + [tuple(_cell(row[column]) for column in columns) for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    lines = [
        "  ".join(
            text.rjust(width) if index >= len(keys) else text.ljust(width)
            for index, (text, width) in enumerate(zip(line, widths))
        )
        for line in cells
    ]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


HOUR = 3600.0
MAX_WINDOW_HOURS = 24 * 366  # --forecast-window


@dataclass
class Spend:
    """One tenant's dollars as of a Forecast's `now`."""

    first: datetime.datetime | None = None  # its earliest record
    today: float = 0.0
    month: float = 0.0
    window: float = 0.0  # in (now - window, now]
    current: bool = False  # a record this month or in the window: listed


@dataclass
class Forecast:
    """Each tenant's spend as of `now`, fed by read() record by record as a Summary is."""

    now: datetime.datetime
    window_hours: float = 6.0
    records: int = 0
    later: int = 0  # records after now, ignored
    torn: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    tenants: dict = field(default_factory=lambda: collections.defaultdict(Spend))

    def __post_init__(self) -> None:
        self.day_start = self.now.replace(hour=0, minute=0, second=0, microsecond=0)
        self.month_start = self.day_start.replace(day=1)
        self.window_start = self.now - datetime.timedelta(hours=self.window_hours)

    def add(self, record: dict) -> None:
        moment = datetime.datetime.fromisoformat(record["time"])
        if moment > self.now:
            self.later += 1
            return
        self.records += 1
        spend, cost = self.tenants[record["tenant"]], record["cost_dollars"] or 0.0
        spend.first = moment if spend.first is None else min(spend.first, moment)
        spend.today += cost if moment >= self.day_start else 0.0
        spend.month += cost if moment >= self.month_start else 0.0
        spend.window += cost if moment > self.window_start else 0.0
        spend.current = spend.current or moment >= self.month_start or moment > self.window_start

    def hours_left(self) -> tuple[float, float]:
        """Hours from now to the end of the UTC day and of the UTC month."""
        day_end = self.day_start + datetime.timedelta(days=1)
        month_end = (self.month_start + datetime.timedelta(days=32)).replace(day=1)
        return (day_end - self.now).total_seconds() / HOUR, (month_end - self.now).total_seconds() / HOUR

    def method(self) -> str:
        return (
            f"rate = the tenant's dollars over the last {self.window_hours:g} h / those hours (or / the hours since "
            "its first record, if later; under 1 h: too little data); forecast = spent so far + rate x hours left "
            "in the UTC day or month"
        )

    def rows(self) -> list[dict]:
        """One row per listed tenant, highest forecast end of month first."""
        rows = [self._row(tenant, spend) for tenant, spend in self.tenants.items() if spend.current]
        return sorted(rows, key=_forecast_order)

    def _row(self, tenant: str, spend: Spend) -> dict:
        span = min(self.window_hours, (self.now - spend.first).total_seconds() / HOUR)
        rate = spend.window / span if span >= 1.0 else None
        day_hours, month_hours = self.hours_left()
        return {
            "tenant": tenant,
            "spent_today_dollars": spend.today,
            "forecast_end_of_day_dollars": None if rate is None else spend.today + rate * day_hours,
            "spent_this_month_dollars": spend.month,
            "forecast_end_of_month_dollars": None if rate is None else spend.month + rate * month_hours,
            "rate_dollars_per_hour": rate,
            "rate_hours": span,
            "too_little_data": rate is None,
        }


def _forecast_order(row: dict) -> tuple:
    month = row["forecast_end_of_month_dollars"]
    return (month is None, -(row["spent_this_month_dollars"] if month is None else month), row["tenant"])


FORECAST_COLUMNS = (
    ("spent today", "spent_today_dollars"),
    ("forecast end of day", "forecast_end_of_day_dollars"),
    ("spent this month", "spent_this_month_dollars"),
    ("forecast end of month", "forecast_end_of_month_dollars"),
    ("rate $/h", "rate_dollars_per_hour"),
    ("over h", "rate_hours"),
)


def render_forecast(forecast: Forecast, form: str) -> str:
    rows = forecast.rows()
    now = forecast.now.isoformat(timespec="microseconds" if forecast.now.microsecond else "seconds")
    now = now.replace("+00:00", "Z")
    if form == "json":
        document = {
            "now": now,
            "window_hours": forecast.window_hours,
            "method": forecast.method(),
            "records": forecast.records,
            "records_after_now": forecast.later,
            "tenants": {row["tenant"]: {k: v for k, v in row.items() if k != "tenant"} for row in rows},
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
    cells = [
        {"tenant": row["tenant"]}
        | {name: row[key] for name, key in FORECAST_COLUMNS}
        | ({"rate $/h": "too little data"} if row["too_little_data"] else {})
        for row in rows
    ]
    table = _table(cells, TENANT_COLUMNS, tuple(name for name, _ in FORECAST_COLUMNS))
    counts = f"{forecast.records} records up to then, {forecast.later} after it ignored"
    return f"as of {now} ({counts})\n{table}\nmethod: {forecast.method()}"


def _utc_time(text: str) -> datetime.datetime:
    """--now: ISO-8601; a time without an offset is UTC."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return moment.replace(tzinfo=datetime.UTC) if moment.tzinfo is None else moment.astimezone(datetime.UTC)


def _hours(text: str) -> float:
    hours = float(text)
    if not 1.0 <= hours <= MAX_WINDOW_HOURS:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_WINDOW_HOURS} hours: {text!r}")
    return hours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onnxserve usage",
        description="Totals of onnxserve usage logs per tenant and per model; with --forecast, each tenant's spend "
        "today and this month and its projection to their ends",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="usage log files (rotated ones too: PATH*)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--json", action="store_const", dest="format", const="json", help="--format json")
    parser.add_argument("--forecast", action="store_true", help="spend today and this month, and its projection")
    parser.add_argument("--forecast-window", type=_hours, default=6.0, metavar="HOURS", help="the rate's window")
    parser.add_argument("--now", type=_utc_time, help="ISO-8601 UTC time to forecast from (default: now)")
    args = parser.parse_args(argv)
    if args.forecast and args.format == "csv":
        parser.error("--forecast prints a table or JSON")
    now = args.now or datetime.datetime.now(datetime.UTC)
    try:
        summary = read(args.paths, Forecast(now, args.forecast_window) if args.forecast else None)
    except OSError as err:
        print(f"onnxserve usage: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    print(render_forecast(summary, args.format) if args.forecast else render(summary, args.format))
    for where in summary.torn:
        print(f"onnxserve usage: {where}: torn last record (a crash mid-write), skipped", file=sys.stderr)
    for where in summary.corrupt:
        print(f"onnxserve usage: {where}: not a usage record, skipped", file=sys.stderr)
    return 1 if summary.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
