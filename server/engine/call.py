"""One request's identity and record on its way through the engine: what a front end names when it
hands a decoded request to the core (server/engine/inference.py), and what the core keeps of it
until its cost is settled. Light on purpose: a front end imports it without the engine's machinery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.queued import Answer, QueuedRequest

if TYPE_CHECKING:  # the version a request resolved to: the core's to set, the front end's to read
    from server.models.repository import ModelVersion

GRPC, HTTP = "grpc", "http"


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
