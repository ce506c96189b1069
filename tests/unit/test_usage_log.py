"""The usage log's writer and reader on real files: whole lines only, a torn tail cut on open and
skipped by the reader, numbered rotation, and totals per tenant and model."""

import json

import pytest

from server import usage
from server.usage_log import FIELDS, UsageLog
from tests.conftest import wait_until


def record(tenant="t1", outcome="ok", rows=2, cost=1e-6, model="m"):
    values = dict.fromkeys(FIELDS)
    values.update(time=1.8e9, request_id="r", tenant=tenant, tenant_source="header", model=model, version="1",
                  protocol="grpc", outcome=outcome, rows=rows, cost_dollars=cost)  # fmt: skip
    return tuple(values[name] for name in FIELDS)


def write(log: UsageLog, *records) -> None:
    for item in records:
        assert log.reserve()
        log.append(item)


def test_records_are_whole_json_lines_with_schema_and_sequence(tmp_path):
    log = UsageLog(str(tmp_path / "usage.log"), fsync_ms=5, max_bytes=0, capacity=100)
    log.open()
    write(log, record("t1"), record("t2", outcome="invalid", cost=None))
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "usage.log").read_text().splitlines()]
    assert [(r["schema"], r["seq"], r["tenant"]) for r in lines] == [(1, 1, "t1"), (1, 2, "t2")]
    assert lines[0]["time"].startswith("2027-01-15T") and lines[0]["time"].endswith("Z")
    assert log.written == 2


def test_a_full_buffer_refuses_and_counts(tmp_path):
    log = UsageLog(str(tmp_path / "usage.log"), fsync_ms=60000, max_bytes=0, capacity=2)
    assert log.reserve() and log.reserve() and not log.reserve()
    assert log.refused == 1


def test_a_torn_tail_is_cut_on_open_and_earlier_records_stay(tmp_path):
    path = tmp_path / "usage.log"
    log = UsageLog(str(path), fsync_ms=5, max_bytes=0, capacity=100)
    log.open()
    write(log, record("t1"), record("t2"))
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"schema": 1, "tenant": "t3", "co')  # a crash mid-write
    summary = usage.read([str(path)])
    assert summary.records == 2 and summary.torn == [f"{path}:3"] and not summary.corrupt

    again = UsageLog(str(path), fsync_ms=5, max_bytes=0, capacity=100)
    again.open()
    assert path.read_bytes() == whole
    write(again, record("t4"))
    again.close()
    summary = usage.read([str(path)])
    assert summary.records == 3 and not summary.torn and list(summary.tenants) == ["t1", "t2", "t4"]


def test_rotation_numbers_files_upwards_and_loses_nothing(tmp_path):
    path = tmp_path / "usage.log"
    (tmp_path / "usage.log.7").write_text("")  # an old one, already shipped: never renamed again
    log = UsageLog(str(path), fsync_ms=1, max_bytes=4096, capacity=10000)
    log.open()
    for batch in range(6):
        write(log, *(record(f"t{batch}") for _ in range(10)))
        assert wait_until(lambda: log.written == 10 * (batch + 1))
    log.close()
    numbers = sorted(int(p.name.split(".")[-1]) for p in tmp_path.iterdir() if p.name.startswith("usage.log."))
    assert numbers[0] == 7 and numbers[1:] == list(range(8, 8 + len(numbers) - 1)) and len(numbers) > 2
    summary = usage.read(sorted(map(str, tmp_path.glob("usage.log*"))) + [str(path)])  # named twice: counted once
    assert summary.records == 60 and not summary.torn


def test_the_reader_totals_by_tenant_and_model_and_flags_corruption(tmp_path, capsys):
    path = tmp_path / "usage.log"
    log = UsageLog(str(path), fsync_ms=5, max_bytes=0, capacity=100)
    log.open()
    write(log, record("t1", cost=2e-6), record("t1", outcome="timeout", cost=None), record("t2", rows=3, model="n"))
    log.close()
    assert usage.main([str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tenants = {row["tenant"]: row for row in report["tenants"]}
    assert tenants["t1"] == {"tenant": "t1", "requests": 2, "ok": 1, "inferences": 2, "cost_dollars": 2e-6, "energy_joules": None}
    assert {(row["model"], row["requests"]) for row in report["models"]} == {("m", 2), ("n", 1)}
    assert usage.main([str(path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "tenant,t1,,,2,1,2,2e-06,"
    assert usage.main([str(path)]) == 0
    assert "t1" in capsys.readouterr().out

    path.write_bytes(b"garbage\n" + path.read_bytes())
    assert usage.main([str(path)]) == 1
    assert f"{path}:1: not a usage record" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        usage.main([])
