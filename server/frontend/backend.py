"""What the transports serve from, handed to them by the composition root (server/app.py).

A transport holds nothing of the rest of the server beyond these: the engine's request API, its
one view of the models, model control, who is calling, and the bounds and threads of its codecs.
Besides them it uses only vocabulary (a request's record and answer, the name rules). So this is
where a front end in a process of its own would plug in: a Backend whose core and control speak
to the engine's process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.frontend.identity import Authenticator
from server.frontend.request_limits import Offload, RequestLimits
from server.frontend.server_info import SERVER_NAME
from server.frontend.shared_regions import SharedRegions
from server.observe.trace_config import TraceConfig
from server.observe.trace_settings import TraceSettings

if TYPE_CHECKING:  # the engine's side, named, not imported: a front end runs without the engine's machinery
    from server.engine.inference import InferenceCore
    from server.frontend.model_info import ModelInfo
    from server.models.control import RepositoryControl


@dataclass(frozen=True)
class Backend:
    core: InferenceCore  # admit, answer and account for a decoded request; readiness
    info: ModelInfo  # metadata, configuration and statistics of the models
    control: RepositoryControl  # index, load, unload
    auth: Authenticator  # API keys, client certificates and tenants
    limits: RequestLimits  # what one request may make the server hold
    offload: Offload  # the codec threads for big requests and answers
    # Triton's system shared memory: the regions callers registered (in a front-end process, a
    # link_regions.RemoteRegions: the engine's registry); None: not served
    regions: SharedRegions | None = None
    traces: TraceSettings = field(default_factory=lambda: TraceSettings(TraceConfig()))  # Triton's (exporting: on)
    name: str = SERVER_NAME  # what ServerMetadata calls the server (--id)
