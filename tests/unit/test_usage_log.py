"""The usage log's writer and reader on real files: whole lines only, a torn tail cut on open and
skipped by the reader, numbered rotation, and totals per tenant and model."""

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from server.engine import usage_log
from server.engine.usage_log import FIELDS, UsageLog
from server.tools import usage
from tests.conftest import ROOT, wait_until


def record(tenant="t1", outcome="ok", rows=2, cost=1e-6, model="m"):
    values = dict.fromkeys(FIELDS)
    values.update(
        time=1.8e9,
        request_id="r",
        tenant=tenant,
        tenant_source="header",
        model=model,
        version="1",
        protocol="grpc",
        outcome=outcome,
        rows=rows,
        cost_dollars=cost,
    )
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
    assert tenants["t1"] == {
        "tenant": "t1",
        "requests": 2,
        "ok": 1,
        "inferences": 2,
        "cost_dollars": 2e-6,
        "energy_joules": None,
    }
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


def rotated(directory) -> dict[int, int]:
    """Numbered files and the records in each."""
    return {int(p.name.rsplit(".", 1)[1]): len(p.read_text().splitlines()) for p in directory.glob("usage.log.*")}


def fill_and_rotate(log: UsageLog, tenant: str, rotations: int) -> None:
    """Write until the log has rotated `rotations` more times (4096 bytes: about a dozen records)."""
    for _ in range(rotations):
        before = len(rotated(log.path.parent))
        write(log, *(record(tenant) for _ in range(16)))
        assert wait_until(lambda: not log.depth and len(rotated(log.path.parent)) > before, 10)


def test_rotated_numbers_are_never_reused_after_shipping_or_a_restart(tmp_path):
    path = tmp_path / "usage.log"
    log = UsageLog(str(path), fsync_ms=1, max_bytes=4096, capacity=1000)
    log.open()
    fill_and_rotate(log, "t1", 2)
    log.close()
    shipped = sorted(rotated(tmp_path))
    assert shipped == [1, 2]
    for number in shipped:  # shipped and removed, as the docs advise
        (tmp_path / f"usage.log.{number}").unlink()

    again = UsageLog(str(path), fsync_ms=1, max_bytes=4096, capacity=1000)  # a restart
    again.open()
    fill_and_rotate(again, "t2", 1)
    assert sorted(rotated(tmp_path)) == [3]
    for number in rotated(tmp_path):
        (tmp_path / f"usage.log.{number}").unlink()
    fill_and_rotate(again, "t3", 1)  # the same process, after a deletion
    again.close()
    assert sorted(rotated(tmp_path)) == [4]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("usage.log.") and not p.name[10:].isdigit()]


def test_a_damaged_rotation_state_falls_back_to_the_files_present(tmp_path, caplog):
    path = tmp_path / "usage.log"
    (tmp_path / "usage.log.5").write_text("")
    (tmp_path / ".usage.log.rotation").write_text("not a number")
    log = UsageLog(str(path), fsync_ms=1, max_bytes=4096, capacity=1000)
    log.open()
    fill_and_rotate(log, "t1", 1)
    log.close()
    assert sorted(rotated(tmp_path)) == [5, 6]
    assert "rotation state" in caplog.text


# In a process of its own: the log's descriptor is above RLIMIT_NOFILE and every lower one is taken,
# so no file can be opened when the log rotates (EMFILE). Then the limit is lifted and a socketpair
# takes the lowest free numbers, which are the log's own if rotation had closed it.
EMFILE_SCRIPT = r"""
import json, os, resource, socket, sys, time
from server.engine.usage_log import FIELDS, UsageLog

path = sys.argv[1]
item = tuple({"time": 1.8e9, "tenant": "t", "rows": 1, "outcome": "ok"}.get(name) for name in FIELDS)


def send(count):
    for _ in range(count):
        assert log.reserve()
        log.append(item)
    deadline = time.monotonic() + 10
    while log.depth and time.monotonic() < deadline:
        time.sleep(0.01)


log = UsageLog(path, fsync_ms=1, max_bytes=4096, capacity=100000)
log.open()
fd = next(int(n) for n in os.listdir("/proc/self/fd") if os.readlink(f"/proc/self/fd/{n}") == path)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))
fillers = []
while True:
    try:
        fillers.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
send(20)  # past 4096 bytes: the rotation's open fails
time.sleep(0.3)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
reader, writer = socket.socketpair()
reader.setblocking(False)
send(20)
time.sleep(1.5)  # a later rotation succeeds once a file can be opened
send(20)
try:
    lost = log.close()
    error = ""
except OSError as err:
    lost, error = None, str(err)
try:
    leaked = len(reader.recv(1 << 20))
except BlockingIOError:
    leaked = 0
print(json.dumps({"leaked": leaked, "lost": lost, "error": error, "written": log.written}))
"""


def test_rotation_that_cannot_open_a_file_keeps_every_record_in_the_old_one(tmp_path):
    path = tmp_path / "usage.log"
    result = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome == {"leaked": 0, "lost": 0, "error": "", "written": 60}, (outcome, result.stderr[-3000:])
    files = [str(path), *(str(p) for p in tmp_path.glob("usage.log.*"))]
    assert usage.read(files).records == 60
    assert rotated(tmp_path), "the rotation is retried once files can be opened"
    assert "cannot rotate" in result.stderr


def test_close_with_an_unwritable_log_says_how_many_records_are_lost(caplog):
    log = UsageLog("/dev/full", fsync_ms=1, max_bytes=0, capacity=100)  # every write fails: ENOSPC
    log.open()
    write(log, record(), record(), record())
    assert log.close() == 3
    assert "3 records could not be written to /dev/full" in caplog.text


def open_to(path) -> list[str]:
    """This process's descriptors open on `path`."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target == str(path):
            found.append(target)
    return found


def test_a_rotation_state_that_is_not_text_counts_as_absent(tmp_path, caplog):
    path = tmp_path / "usage.log"
    (tmp_path / "usage.log.5").write_text("")
    (tmp_path / ".usage.log.rotation").write_bytes(b"\xff\xfe7\x00\n")  # not UTF-8: a damaged disk, a stray copy
    log = UsageLog(str(path), fsync_ms=1, max_bytes=4096, capacity=1000)
    log.open()
    fill_and_rotate(log, "t1", 2)
    assert log.close() == 0
    assert sorted(rotated(tmp_path)) == [5, 6, 7]
    assert "rotation state" in caplog.text and not open_to(tmp_path / ".usage.log.next")
    assert usage.read([str(path), *map(str, tmp_path.glob("usage.log.*"))]).records == 32


def test_the_writer_outlives_any_error_in_a_rotation_and_keeps_no_descriptor(tmp_path, caplog, monkeypatch):
    path = tmp_path / "usage.log"
    log = UsageLog(str(path), fsync_ms=1, max_bytes=4096, capacity=1000)
    numbering, failures = UsageLog._next_number, []

    def broken_once(self):
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug in the numbering")
        return numbering(self)

    monkeypatch.setattr(UsageLog, "_next_number", broken_once)
    log.open()
    write(log, *(record("t1") for _ in range(16)))  # past 4096 bytes: the rotation fails
    assert wait_until(lambda: failures and not log.depth)
    assert not open_to(tmp_path / ".usage.log.next") and not (tmp_path / ".usage.log.next").exists()
    sent = 16
    while not rotated(tmp_path) and sent < 16 + 4 * 25:  # the current file takes them until the retry, a second later
        write(log, *(record("t2") for _ in range(4)))
        sent += 4
        assert wait_until(lambda: not log.depth)
        time.sleep(0.1)
    assert rotated(tmp_path) and sent > 16
    assert log.close() == 0
    assert "cannot rotate" in caplog.text and "a bug in the numbering" in caplog.text
    assert usage.read([str(path), *map(str, tmp_path.glob("usage.log.*"))]).records == sent


def test_close_waits_for_a_hung_disk_only_until_its_timeout(tmp_path, caplog, monkeypatch):
    log = UsageLog(str(tmp_path / "usage.log"), fsync_ms=1, max_bytes=0, capacity=100)
    hung, release, real_fsync = threading.Event(), threading.Event(), os.fsync

    def fsync(fd):
        if fd == log._fd:  # a dead NFS server: the call never returns
            hung.set()
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log.open()
    try:
        write(log, record(), record())
        assert hung.wait(5)
        write(log, record())  # waits behind the hung one
        started = time.monotonic()
        assert log.close(timeout=0.3) == 3
        assert time.monotonic() - started < 1
        assert "3 records are not known to be written" in caplog.text
    finally:
        release.set()


def test_a_failing_close_of_the_file_is_logged_not_raised(tmp_path, caplog, monkeypatch):
    log = UsageLog(str(tmp_path / "usage.log"), fsync_ms=1, max_bytes=0, capacity=100)
    real_close = os.close

    def close(fd):
        real_close(fd)
        if fd == log._fd:  # NFS reports a failed write-back at close
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    log.open()
    write(log, record())
    assert wait_until(lambda: log.written == 1)
    monkeypatch.setattr(os, "close", close)
    assert log.close() == 0
    assert "cannot close" in caplog.text


def test_a_rotation_that_keeps_failing_is_logged_once_per_window_and_again_after_a_success(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(usage_log, "ROTATION_RETRY_SECONDS", 0.01)
    caplog.set_level(logging.INFO, logger="server.engine.usage_log")
    path = tmp_path / "usage.log"
    log = UsageLog(str(path), fsync_ms=1, max_bytes=1024, capacity=1000)
    numbering, broken = UsageLog._next_number, [True]

    def next_number(self):
        if broken[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return numbering(self)

    def told() -> int:
        return caplog.text.count("cannot rotate")

    monkeypatch.setattr(UsageLog, "_next_number", next_number)
    log.open()
    for _ in range(5):  # five failed attempts, one line
        write(log, *(record() for _ in range(4)))
        assert wait_until(lambda: not log.depth)
        time.sleep(0.02)
    assert told() == 1 and log._failed_rotations == 5
    broken[0] = False
    write(log, record())
    assert wait_until(lambda: rotated(tmp_path))
    assert "after 5 failed attempt(s)" in caplog.text
    broken[0] = True
    write(log, *(record() for _ in range(4)))  # a new failure after a success: told at once
    assert wait_until(lambda: told() == 2)
    assert log.close() == 0
