"""The tenant limits file: YAML and JSON alike, inheritance from `default`, the checks that name the
file and the field, and the follower that re-reads the file when it changes."""

import asyncio
import json
import logging
import os

import pytest
import yaml

from server.engine import tenant_limits
from server.engine.tenant_limits import (
    WINDOWS,
    LimitsFollower,
    TenantLimit,
    TenantLimits,
    parse_limits,
    read_limits,
)
from server.errors import ConfigError
from server.frontend import identity

YAML = """\
default:                      # every tenant not listed below
  requests_per_second: 200    # token bucket: refill rate ...
  request_burst: 400          # ... and capacity
  rows_per_second: 2000       # a second bucket on batch rows
  row_burst: 4000
  max_in_flight: 64
  priority: 2
  weight: 1.0
  budget_dollars:
    hour: 1.50
    day: 20
    month: 400
tenants:
  team-a:
    requests_per_second: 50
    budget_dollars: {day: 5}
  team-b:
    weight: 3
"""
DEFAULT = TenantLimit(200.0, 400.0, 2000.0, 4000.0, 64, 2, 1.0, (("hour", 1.5), ("day", 20.0), ("month", 400.0)))


def write(path, text: str) -> str:
    """As operators and Kubernetes do: a whole new file under a temporary name, then renamed."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)
    return str(path)


def test_yaml_and_the_same_as_json_parse_equal(tmp_path):
    from_yaml = read_limits(write(tmp_path / "limits", YAML))
    from_json = read_limits(write(tmp_path / "limits", json.dumps(yaml.safe_load(YAML))))
    assert from_yaml == from_json and from_yaml.source == str(tmp_path / "limits")
    assert from_yaml.default == DEFAULT
    assert [name for name, _ in from_yaml.tenants] == ["team-a", "team-b"]


def test_a_tenant_inherits_each_field_it_does_not_set_and_each_budget_window():
    limits = parse_limits(YAML, "limits.yaml")
    team_a, team_b = limits.of("team-a"), limits.of("team-b")
    assert team_a.requests_per_second == 50 and team_a.request_burst == 400, "the burst is the default's"
    assert (team_a.rows_per_second, team_a.row_burst, team_a.max_in_flight) == (2000, 4000, 64)
    assert (team_a.priority, team_a.weight) == (2, 1.0)
    assert team_a.budget_dollars == (("hour", 1.5), ("day", 5.0), ("month", 400.0))
    assert [team_a.budget(window) for window in WINDOWS] == [1.5, 5.0, 400.0]
    assert team_b == TenantLimit(200, 400, 2000, 4000, 64, 2, 3.0, DEFAULT.budget_dollars)
    with pytest.raises(ValueError, match="unknown budget window"):
        team_a.budget("week")


def test_of_answers_a_listed_tenant_its_own_and_any_other_the_default():
    limits = parse_limits(YAML, "limits.yaml")
    assert limits.of("team-b").weight == 3.0
    assert limits.of("team-z") is limits.default and limits.of("unknown") is limits.default


def test_absent_fields_are_unlimited_and_a_burst_defaults_to_its_rate_at_least_one():
    limits = parse_limits("{}", "limits.json")
    assert limits == TenantLimits("limits.json", TenantLimit(), ())
    assert limits.default.budget("day") is None
    one = parse_limits("default: {requests_per_second: 0.5, rows_per_second: 300}\ntenants: {t: }", "x")
    assert (one.default.request_burst, one.default.row_burst) == (1.0, 300.0)
    assert one.of("t") == one.default


def test_an_explicit_null_sets_a_field_back_to_unlimited_instead_of_inheriting_it():
    text = YAML + "  team-c:\n    requests_per_second: null\n    priority: null\n    budget_dollars: {day: null}\n"
    team_c = parse_limits(text, "limits.yaml").of("team-c")
    assert (team_c.requests_per_second, team_c.request_burst, team_c.priority) == (None, None, 0)
    assert team_c.budget_dollars == (("hour", 1.5), ("month", 400.0)) and team_c.rows_per_second == 2000
    text = YAML + "  team-d:\n    budget_dollars: null\n"
    assert parse_limits(text, "limits.yaml").of("team-d").budget_dollars == ()


@pytest.mark.parametrize(
    "text, named",
    [
        ("[1, 2]", ": must hold a mapping with ['default', 'tenants']; got [1, 2]"),
        ("default: {}\ntenant: {}", ": unknown fields ['tenant']; known: ['default', 'tenants']"),
        ("default: [1]", ": default: must be a mapping of ['requests_per_second',"),
        ("default: {rps: 5}", ": default: unknown fields ['rps']; known: ['requests_per_second',"),
        ("default: {requests_per_second: 0}", ": default.requests_per_second: must be a number > 0; got 0"),
        ("default: {requests_per_second: '5'}", ": default.requests_per_second: must be a number > 0; got '5'"),
        ("default: {rows_per_second: true}", ": default.rows_per_second: must be a number > 0; got True"),
        ("default: {weight: .nan}", ": default.weight: must be a number > 0; got nan"),
        ("default: {requests_per_second: .inf}", ": default.requests_per_second: must be a number > 0; got inf"),
        ("default: {requests_per_second: 5, request_burst: 0.5}", ".request_burst: must be a number >= 1; got 0.5"),
        ("default: {request_burst: 10}", ": default.request_burst: has no effect without requests_per_second"),
        ("default: {max_in_flight: 0}", ": default.max_in_flight: must be an integer >= 1; got 0"),
        ("default: {max_in_flight: 2.0}", ": default.max_in_flight: must be an integer >= 1; got 2.0"),
        ("default: {priority: -1}", ": default.priority: must be an integer >= 0; got -1"),
        ("default: {budget_dollars: 5}", ": default.budget_dollars: must map windows ['hour', 'day', 'month']"),
        ("default: {budget_dollars: {week: 5}}", ": default.budget_dollars: unknown fields ['week']; known: ['hour',"),
        (
            "tenants: {team-a: {budget_dollars: {day: -1}}}",
            ": tenants['team-a'].budget_dollars.day: must be a number >= 0; got -1",
        ),
        ("tenants: {team-a: {weight: 0}}", ": tenants['team-a'].weight: must be a number > 0; got 0"),
        ("tenants: {team-a: {row_burst: 9}}", ": tenants['team-a'].row_burst: has no effect without rows_per_second"),
        ("tenants: [team-a]", ": tenants: must map tenant names to entries; got ['team-a']"),
        ("tenants: {team-a: 5}", ": tenants['team-a']: must be a mapping of"),
        ("tenants: {unknown: {}}", ": tenants['unknown']: 'unknown' is not a tenant name"),
        ('tenants: {"bad\\nname": {}}', ": tenants['bad\\nname']: 'bad\\nname' is not a tenant name"),
        ("tenants: {123: {}}", ": tenants[123]: 123 is not a tenant name"),
        ("default: {weight: [", ": neither JSON nor YAML"),
        ("[" * 100_000, ": neither JSON nor YAML"),
        ("", ": must hold a mapping with ['default', 'tenants']; got None"),
    ],
)
def test_a_bad_file_names_the_file_the_field_and_the_value(tmp_path, text, named):
    path = write(tmp_path / "limits.yaml", text)
    with pytest.raises(ConfigError) as raised:
        read_limits(path)
    assert str(raised.value).startswith(path) and named in str(raised.value), str(raised.value)


def test_the_file_is_bounded_in_size_and_in_tenants(tmp_path):
    with pytest.raises(ConfigError, match=r"limits.yaml: must be at most 1048576 bytes; got more"):
        read_limits(write(tmp_path / "limits.yaml", "#" * (tenant_limits.MAX_BYTES + 1)))
    many = {"tenants": {f"t{index}": {} for index in range(tenant_limits.MAX_TENANTS + 1)}}
    with pytest.raises(ConfigError, match=r"x.json: tenants: at most 10000 tenants; got 10001"):
        parse_limits(json.dumps(many), "x.json")
    with pytest.raises(ConfigError, match=r"cannot be read"):
        read_limits(str(tmp_path / "missing.yaml"))
    (tmp_path / "latin1.yaml").write_bytes(b"default: {}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text"):
        read_limits(str(tmp_path / "latin1.yaml"))


@pytest.mark.parametrize(
    "name", ["team-a", "a", "A b.c:d@e/f_g-h", "x" * 128, "x" * 129, "unknown", "other", "-a", " a", "a\n", "", "é", 7]
)
def test_tenant_names_follow_the_api_keys_file_rule(name):
    """One rule (server/engine/call.py's) for both files: they accept and refuse the same names."""
    try:
        identity._tenant(name, "where")
        accepted = True
    except ConfigError:
        accepted = False
    document = json.dumps({"tenants": {name: {}}}) if isinstance(name, str) else f"tenants: {{{name}: {{}}}}"
    try:
        parse_limits(document, "limits.json")
        assert accepted, f"{name!r} is refused by --api-keys but accepted here"
    except ConfigError as err:
        assert not accepted and "is not a tenant name" in str(err), f"{name!r}: {err}"


def test_the_follower_picks_up_a_new_file_keeps_the_old_limits_on_a_broken_one_then_picks_up_a_good_one(
    tmp_path, caplog
):
    path = write(tmp_path / "limits.yaml", YAML)
    follower = LimitsFollower(path)
    first = follower.current
    seen: list[TenantLimits] = []
    follower.on_change.append(seen.append)

    async def until(condition) -> None:
        for _ in range(400):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the follower did not get there in 4 seconds")

    async def scenario() -> None:
        task = asyncio.create_task(follower.follow(period=0.05))
        try:
            write(tmp_path / "limits.yaml", YAML.replace("requests_per_second: 50", "requests_per_second: 60"))
            await until(lambda: follower.current is not first and seen)
            assert follower.current.of("team-a").requests_per_second == 60 and seen == [follower.current]
            second = follower.current
            with caplog.at_level(logging.ERROR, logger="server.followed_file"):
                write(tmp_path / "limits.yaml", YAML + "  team-c: {weight: -2}\n")
                await until(lambda: any(record.levelno == logging.ERROR for record in caplog.records))
            assert follower.current is second and len(seen) == 1
            (error,) = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
            assert f"{path}: tenants['team-c'].weight: must be a number > 0; got -2" in error and "previous" in error
            write(tmp_path / "limits.yaml", json.dumps({"tenants": {"team-c": {"weight": 2}}}))
            await until(lambda: len(seen) == 2)
            assert follower.current is seen[1] and follower.current.of("team-c").weight == 2.0
            assert follower.current.of("team-a") == TenantLimit()
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_a_file_broken_at_start_is_an_error_for_the_caller(tmp_path):
    with pytest.raises(ConfigError, match=r"limits.yaml: default.priority: must be an integer >= 0; got 'high'"):
        LimitsFollower(write(tmp_path / "limits.yaml", "default: {priority: high}"))
