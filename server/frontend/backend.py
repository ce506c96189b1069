"""What the transports serve from, handed to them by the composition root (server/app.py).

A transport reaches nothing beyond these: the engine's request API, its one view of the models,
model control, who is calling, and the bounds and threads of its codecs. This is the front end's
whole dependency on the rest of the server, so it is where a front end in a process of its own
would plug in."""

from dataclasses import dataclass

from server.engine.inference import InferenceCore
from server.frontend.identity import Authenticator
from server.frontend.model_info import ModelInfo
from server.frontend.request_limits import Offload, RequestLimits
from server.models.control import RepositoryControl


@dataclass(frozen=True)
class Backend:
    core: InferenceCore  # admit, answer and account for a decoded request; readiness
    info: ModelInfo  # metadata, configuration and statistics of the models
    control: RepositoryControl  # index, load, unload
    auth: Authenticator  # API keys, client certificates and tenants
    limits: RequestLimits  # what one request may make the server hold
    offload: Offload  # the codec threads for big requests and answers
