"""One request's identity and record on its way through the engine: what a front end names when it
hands a decoded request to the core (server/engine/inference.py), and what the core keeps of it
until its cost is settled. Light on purpose: a front end imports it without the engine's machinery."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.queued import Answer, QueuedRequest
from server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, ServingError, TenantRefused

if TYPE_CHECKING:  # the version a request resolved to: the core's to set, the front end's to read
    from server.models.repository import ModelVersion

GRPC, HTTP = "grpc", "http"
UNKNOWN, OTHER = "unknown", "other"  # no identity; tenants folded past --max-tenant-series
# A tenant's name, in the API keys file and the tenant limits alike
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,127}")
OUTCOMES = {
    InvalidInput: "invalid",
    Overloaded: "rejected",
    DeadlineExceeded: "timeout",
    ModelNotFound: "invalid",
    TenantRefused: "refused",
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as the front end established it (server/frontend/identity.py)."""

    tenant: str  # the real name: the usage log's
    label: str  # the name on /metrics: the tenant, or "other" once --max-tenant-series are taken
    source: str  # api_key, certificate, header or none


@dataclass(slots=True)
class Call:
    """One inference request on its way through the server."""

    started: float  # perf_counter()
    protocol: str  # GRPC or HTTP
    identity: Identity
    model: ModelVersion | None = None  # once the name resolved: its events carry the labels
    rows: int = 0
    outputs: tuple[str, ...] = ()
    request_id: str = ""  # the caller's own id, if it gave one
    requested: tuple[str, str] = ("", "")  # the model name and version asked for
    reserved: bool = False  # holds a place in the usage log's buffer
    item: QueuedRequest | None = None  # once queued: what its batch did
    answer: Answer | None = None
    link: int = 0  # in a front-end process: the request's number on its link to the engine
    trace_parent: tuple[str, str] | None = None  # the client's traceparent and tracestate, where tracing is on
    span: object = None  # its tracing.RequestSpan, where it is traced (server/observe/tracing.py)
    governed: bool = False  # counted in flight by the tenant limits (server/engine/governor.py)


def outcome_of(error: BaseException | None) -> str:
    """The `outcome` label of a request that ended with `error` (None: answered)."""
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, ServingError):
        return OUTCOMES.get(type(error), "rejected")
    return "error"


@contextlib.contextmanager
def request_scope(core, protocol: str, identity: Identity) -> Iterator[Call]:
    """`core.request()` of the engine's core and of a front end's proxy of it: one request from
    receipt to response, its outcome reported (`core.end`) however the block ends."""
    call = core.start(protocol, identity)
    try:
        yield call
    except BaseException as err:
        core.end(call, err)
        raise
    core.end(call)
