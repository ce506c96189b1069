"""The tenant limits file (--tenant-limits PATH): JSON or YAML by content (JSON first, then YAML's safe
loader), a `default` entry for every tenant not named and `tenants`, each inheriting every field it does
not set from `default` (budget_dollars window by window; an explicit null means unlimited, not inherited).
Errors name the file, the field path and the bad value. Tenant names follow --api-keys' rule
(server/frontend/identity.py's _tenant), repeated here because the engine may not import a front end
(tests/unit/test_layout.py); tests/unit/test_tenant_limits.py checks that the two agree."""

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import orjson
import yaml

from server.engine.call import OTHER, TENANT_NAME, UNKNOWN
from server.errors import ConfigError, shown
from server.followed_file import FollowedFile

log = logging.getLogger(__name__)

WINDOWS = ("hour", "day", "month")  # spend windows, calendar UTC: the current hour, day and month
TOP_FIELDS = ("default", "tenants")
BURSTS = {"request_burst": "requests_per_second", "row_burst": "rows_per_second"}  # bucket capacity -> its rate
MAX_BYTES = 1 << 20  # of the file: a server process reads it, at start and on every change
MAX_TENANTS = 10_000
RESERVED = (UNKNOWN, OTHER)  # names the server gives: no tenant may take them
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # yaml.safe_load's rules, in C where built


@dataclass(frozen=True)
class TenantLimit:
    """One tenant's limits, already merged over the default; None is unlimited."""

    requests_per_second: float | None = None
    request_burst: float | None = None  # None when requests_per_second is None, else burst or max(1, rate)
    rows_per_second: float | None = None
    row_burst: float | None = None  # likewise, for rows_per_second
    max_in_flight: int | None = None
    priority: int = 0  # 0: the model's default; else mapped onto its priority levels (1 highest)
    weight: float = 1.0
    budget_dollars: tuple[tuple[str, float], ...] = ()  # (window, dollars) for the windows set, in WINDOWS order

    def budget(self, window: str) -> float | None:
        """Dollars the tenant may spend in the current `window`, or None for no bound."""
        if window not in WINDOWS:
            raise ValueError(f"unknown budget window {window!r}; known: {list(WINDOWS)}")
        return next((dollars for name, dollars in self.budget_dollars if name == window), None)


FIELDS = tuple(each.name for each in fields(TenantLimit))  # an entry's fields, as the file spells them


@dataclass(frozen=True)
class TenantLimits:
    """The whole file: the default and each named tenant's limits."""

    source: str  # the path
    default: TenantLimit
    tenants: tuple[tuple[str, TenantLimit], ...]  # sorted by name; each already merged over default
    _by_name: dict[str, TenantLimit] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", dict(self.tenants))  # of() runs per request

    def of(self, tenant: str) -> TenantLimit:
        return self._by_name.get(tenant, self.default)


def read_limits(path: str) -> TenantLimits:
    """Read, parse and check the file (blocking); ConfigError names the file and the field."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: must be at most {MAX_BYTES} bytes; got more")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    return parse_limits(text, path)


def parse_limits(text: str, source: str) -> TenantLimits:
    """Parse and check the file's text; `source` names it in every error."""
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_BYTES:
        raise ConfigError(f"{source}: must be at most {MAX_BYTES} bytes; got {size}")
    document = _load(text, source)
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: must hold a mapping with {list(TOP_FIELDS)}; got {shown(repr(document))}")
    _known(document, TOP_FIELDS, source)
    default = _entry(document.get("default"), f"{source}: default")
    named = {} if document.get("tenants") is None else document["tenants"]
    if not isinstance(named, dict):
        raise ConfigError(f"{source}: tenants: must map tenant names to entries; got {shown(repr(named))}")
    if len(named) > MAX_TENANTS:
        raise ConfigError(f"{source}: tenants: at most {MAX_TENANTS} tenants; got {len(named)}")
    tenants = []
    for name, value in named.items():
        where = f"{source}: tenants[{name!r}]"
        _tenant_name(name, where)
        own = _entry(value, where)
        tenants.append((name, _limit(_merge(default, own), own, where)))
    tenants.sort(key=lambda pair: pair[0])
    return TenantLimits(source, _limit(default, default, f"{source}: default"), tuple(tenants))


def _load(text: str, source: str):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return yaml.load(text, Loader=YAML_LOADER)
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a bad !!timestamp
        raise ConfigError(f"{source}: neither JSON nor YAML: {err}") from None


def _known(mapping: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted((key for key in mapping if key not in known), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; known: {list(known)}")


def _tenant_name(name, where: str) -> None:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError(
            f"{where}: {name!r} is not a tenant name (1-128 of letters, digits, spaces and ._:@/-, not 'unknown' or 'other')"
        )


def _entry(value, where: str) -> dict:
    """The fields an entry sets, checked: {field: value or None}; budget_dollars as {window: dollars or None}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping of {list(FIELDS)}; got {shown(repr(value))}")
    _known(value, FIELDS, where)
    return {name: CHECKS[name](setting, f"{where}.{name}") for name, setting in value.items()}


def _merge(default: dict, own: dict) -> dict:
    merged = {**default, **own}
    if isinstance(own.get("budget_dollars"), dict):  # window by window
        merged["budget_dollars"] = {**(default.get("budget_dollars") or {}), **own["budget_dollars"]}
    return merged


def _limit(merged: dict, own: dict, where: str) -> TenantLimit:
    for burst, rate in BURSTS.items():
        if own.get(burst) is not None and merged.get(rate) is None:
            raise ConfigError(f"{where}.{burst}: has no effect without {rate} (here or in default); got {own[burst]:g}")
    budgets = merged.get("budget_dollars") or {}
    # A bucket's capacity: none without its rate, else the burst set, by default the rate and at least 1.
    capacity = {b: None if merged.get(r) is None else merged.get(b) or max(1.0, merged[r]) for b, r in BURSTS.items()}
    return TenantLimit(
        requests_per_second=merged.get("requests_per_second"),
        request_burst=capacity["request_burst"],
        rows_per_second=merged.get("rows_per_second"),
        row_burst=capacity["row_burst"],
        max_in_flight=merged.get("max_in_flight"),
        priority=merged.get("priority") or 0,
        weight=merged.get("weight") or 1.0,
        budget_dollars=tuple((window, budgets[window]) for window in WINDOWS if budgets.get(window) is not None),
    )


def _number(low: float, strict: bool = False, integer: bool = False) -> Callable:
    """A check: a finite number (an integer where `integer`) > low where `strict`, else >= low; None stays None."""

    def check(value, where: str):
        if value is None:
            return None
        typed = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        if not typed or not abs(value) <= sys.float_info.max or value < low or (strict and value == low):  # NaN fails
            kind, sign = "an integer" if integer else "a number", ">" if strict else ">="
            raise ConfigError(f"{where}: must be {kind} {sign} {low:g}; got {shown(repr(value))}")
        return value if integer else float(value)

    return check


def _budgets(value, where: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must map windows {list(WINDOWS)} to dollars; got {shown(repr(value))}")
    _known(value, WINDOWS, where)
    return {window: _dollars(dollars, f"{where}.{window}") for window, dollars in value.items()}


_dollars = _number(0)
CHECKS = {
    "requests_per_second": _number(0, strict=True),
    "request_burst": _number(1),  # a bucket of less than one token admits nothing
    "rows_per_second": _number(0, strict=True),
    "row_burst": _number(1),
    "max_in_flight": _number(1, integer=True),
    "priority": _number(0, integer=True),
    "weight": _number(0, strict=True),
    "budget_dollars": _budgets,
}


class LimitsFollower(FollowedFile[TenantLimits]):
    """The current TenantLimits, re-read when the file changes (server/followed_file.py)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, read_limits, "tenant limits")
