"""Who is calling: API keys (SHA-256 hashes mapped to tenants, in a JSON file re-read when it
changes), the client certificate's name under mutual TLS, and a trusted gateway's header; and the
bounded set of tenant names that get series of their own on /metrics.

A tenant comes from the most trusted source configured: the API key, else the client certificate,
else the x-tenant-id header (only with --trust-tenant-header), else "unknown". With --api-keys set,
every call but the server's health and readiness needs a valid key, or, under mutual TLS, a client
certificate whose subject CN the file's "certificates" maps to a tenant; without --api-keys, a
verified client certificate's CN is the tenant. A subject with no CN or several names no one
(server/frontend/tls.py common_name). A reload replaces `keys` with a new KeyFile, never changes it in place:
open streams compare it to tell when to check their caller again.
"""

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from server.engine.call import OTHER, TENANT_NAME, UNKNOWN, Identity
from server.errors import ConfigError, Unauthenticated
from server.followed_file import FollowedFile

log = logging.getLogger(__name__)

TENANT_HEADER = "x-tenant-id"
AUTHORIZATION = "authorization"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FILE_FIELDS = ("keys", "certificates", "tenants")


@dataclass(frozen=True)
class KeyFile:
    """The parsed --api-keys file."""

    keys: dict[bytes, str]  # SHA-256 digest of a key -> its tenant
    certificates: dict[str, str]  # client certificate subject CN -> tenant
    budgets: dict[str, float]  # tenant -> dollars per hour, for the budget alert

    @property
    def tenants(self) -> set[str]:
        return set(self.keys.values())


def read_key_file(path: str) -> KeyFile:
    """Parse and check the --api-keys file; ConfigError names the file and the field."""
    try:
        document = orjson.loads(Path(path).read_bytes())
    except OSError as err:
        raise ConfigError(f"--api-keys: {path}: cannot be read: {err.strerror}") from None
    except orjson.JSONDecodeError as err:
        raise ConfigError(f"--api-keys: {path}: not valid JSON: {err}") from None
    where = f"--api-keys: {path}"
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: the file must hold a JSON object with a 'keys' list")
    unknown = sorted(set(document) - set(FILE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; known: {list(FILE_FIELDS)}")
    keys = _keys(document.get("keys"), where)
    certificates = _certificates(document.get("certificates", {}), where)
    budgets = _budgets(document.get("tenants", {}), where)
    return KeyFile(keys, certificates, budgets)


def _keys(entries, where: str) -> dict[bytes, str]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where}: \'keys\' must be a non-empty list of {{"sha256": ..., "tenant": ...}}')
    keys: dict[bytes, str] = {}
    for index, entry in enumerate(entries):
        at = f"{where}: keys[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be an object with 'sha256' and 'tenant'")
        extra = sorted(set(entry) - {"sha256", "tenant", "name"})
        if extra:
            raise ConfigError(f"{at}: unknown fields {extra}; known: ['sha256', 'tenant', 'name']")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest.lower()):
            raise ConfigError(f"{at}.sha256: must be 64 hex digits, the SHA-256 of the key (printf %s KEY | sha256sum)")
        key = bytes.fromhex(digest)
        if key in keys:
            raise ConfigError(f"{at}.sha256: the same key is listed twice")
        keys[key] = _tenant(entry.get("tenant"), f"{at}.tenant")
    return keys


def _certificates(mapping, where: str) -> dict[str, str]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: 'certificates' must map a client certificate's subject CN to a tenant")
    return {str(name): _tenant(tenant, f"{where}: certificates[{name!r}]") for name, tenant in mapping.items()}


def _budgets(mapping, where: str) -> dict[str, float]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: 'tenants' must map a tenant to {{\"budget_dollars_per_hour\": N}}")
    budgets = {}
    for tenant, settings in mapping.items():
        at = f"{where}: tenants[{tenant!r}]"
        _tenant(tenant, at)
        if not isinstance(settings, dict) or set(settings) - {"budget_dollars_per_hour"}:
            raise ConfigError(f"{at}: only 'budget_dollars_per_hour' is known")
        budget = settings.get("budget_dollars_per_hour")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
                raise ConfigError(f"{at}.budget_dollars_per_hour: must be a number >= 0; got {budget!r}")
            budgets[tenant] = float(budget)
    return budgets


def _tenant(name, where: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name) or name in (UNKNOWN, OTHER):
        raise ConfigError(
            f"{where}: {name!r} is not a tenant name (1-128 of letters, digits, spaces and ._:@/-, not "
            f"'{UNKNOWN}' or '{OTHER}')"
        )
    return name


@dataclass
class TenantLabels:
    """The first --max-tenant-series tenants seen keep their name on /metrics; later ones count as
    "other", each distinct one once in `folded` (remembered up to a bound, so memory stays bounded)."""

    limit: int
    named: set[str] = field(default_factory=lambda: {UNKNOWN})
    folded_names: set[str] = field(default_factory=set)
    folded: int = 0

    FOLDED_REMEMBERED = 100_000

    def label(self, tenant: str) -> str:
        if tenant in self.named:
            return tenant
        if len(self.named) - 1 < self.limit:  # "unknown" takes no place
            self.named.add(tenant)
            return tenant
        if tenant not in self.folded_names:
            self.folded += 1
            if len(self.folded_names) < self.FOLDED_REMEMBERED:
                self.folded_names.add(tenant)
            if self.folded == 1:
                log.warning(
                    "more than %d tenants (--max-tenant-series): %r and later ones count as tenant=%r on "
                    "/metrics; the usage log keeps their names",
                    self.limit,
                    tenant,
                    OTHER,
                )
        return OTHER


class Authenticator:
    """Resolves each call's Identity; with keys, refuses calls without a valid one."""

    def __init__(self, keys_path: str, trust_header: bool, mutual_tls: bool, max_tenant_series: int) -> None:
        self.trust_header = trust_header
        self.mutual_tls = mutual_tls
        self.labels = TenantLabels(max_tenant_series)
        self._file = FollowedFile(keys_path, read_key_file, "API keys") if keys_path else None
        self.refused = {"missing": 0, "invalid": 0}  # calls refused for want of a valid key
        self.anonymous = Identity(UNKNOWN, UNKNOWN, "none")
        # Nothing to read from a call: every caller is "unknown", and nothing is parsed per call.
        self.reads_calls = bool(keys_path or trust_header or mutual_tls)
        if self.keys is not None:
            log.info("API keys: %d keys of %d tenants from %s", len(self.keys.keys), len(self.keys.tenants), keys_path)
            if self.keys.budgets:
                log.warning(
                    "API keys: %s: tenants' budget_dollars_per_hour is deprecated and enforces nothing; budgets "
                    "that are enforced live in --tenant-limits (budget_dollars: {hour: ...})",
                    keys_path,
                )

    def identify(self, authorization: str | None, certificate_name: str | None, header: str | None) -> Identity:
        """The caller's identity from what its call carried; Unauthenticated when keys are
        required and it has none, or one that is not in the file."""
        if self.keys is not None:
            if not authorization and certificate_name in self.keys.certificates:  # a listed certificate is a key
                tenant = self.keys.certificates[certificate_name]
                return Identity(tenant, self.labels.label(tenant), "certificate")
            tenant = self._tenant_of_key(authorization)
            return Identity(tenant, self.labels.label(tenant), "api_key")
        if certificate_name:
            tenant = self.certificate_tenant(certificate_name)
            return Identity(tenant, self.labels.label(tenant), "certificate")
        if header and self.trust_header and TENANT_NAME.fullmatch(header) and header not in (UNKNOWN, OTHER):
            return Identity(header, self.labels.label(header), "header")
        return self.anonymous

    def _tenant_of_key(self, authorization: str | None) -> str:
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            self.refused["missing"] += 1
            raise Unauthenticated("an API key is required: send the header 'authorization: Bearer <key>'")
        # The lookup is by the key's SHA-256 digest: its timing depends on that digest only, which
        # tells a caller nothing about any valid key.
        tenant = self.keys.keys.get(hashlib.sha256(key.strip().encode()).digest())
        if tenant is None:
            self.refused["invalid"] += 1
            raise Unauthenticated("the API key is not valid (not in --api-keys; revoked or mistyped?)")
        return tenant

    def certificate_tenant(self, common_name: str) -> str:
        """The tenant a client certificate's subject CN names: the file's mapping, else the CN itself."""
        if self.keys is not None and common_name in self.keys.certificates:
            return self.keys.certificates[common_name]
        return common_name if TENANT_NAME.fullmatch(common_name) and common_name not in (UNKNOWN, OTHER) else UNKNOWN

    @property
    def keys(self) -> KeyFile | None:
        """The keys file as last read: another object after each change (a stream checks its key again then)."""
        return self._file.current if self._file is not None else None

    async def follow(self, period: float = 1.0) -> None:
        """Re-read the keys file whenever it changes; a broken new file keeps the old keys and logs why."""
        if self._file is not None:
            await self._file.follow(period)
