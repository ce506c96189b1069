"""`onnxserve usage PATH...` (or `python -m server.tools.usage`): totals of usage logs per tenant and per
model, as a table, CSV or JSON. Rotated files (PATH.1, PATH.2, ...) are read when named, e.g.
`onnxserve usage /var/log/onnxserve/usage.log*`; a file named twice counts once.

A torn last line (a crash mid-write) is skipped and reported; any other line that is not a record
is reported as corrupt and makes the exit status 1, after the totals."""

import argparse
import collections
import csv
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


def read(paths: list[str]) -> Summary:
    summary, seen = Summary(), set()
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


def _table(rows: list[dict], keys: tuple[str, ...]) -> str:
    columns = (*keys, *VALUE_COLUMNS)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onnxserve usage", description="Totals of onnxserve usage logs per tenant and per model"
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="usage log files (rotated ones too: PATH*)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)
    try:
        summary = read(args.paths)
    except OSError as err:
        print(f"onnxserve usage: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    print(render(summary, args.format))
    for where in summary.torn:
        print(f"onnxserve usage: {where}: torn last record (a crash mid-write), skipped", file=sys.stderr)
    for where in summary.corrupt:
        print(f"onnxserve usage: {where}: not a usage record, skipped", file=sys.stderr)
    return 1 if summary.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
