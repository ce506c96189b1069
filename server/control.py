"""The model repository extension's RPCs (RepositoryIndex, RepositoryModelLoad,
RepositoryModelUnload): gRPC messages to repository calls and back."""

import logging

from server import protocol
from server.errors import ControlDisabled
from server.overrides import parse_load_parameters
from server.repository import READY, ModelRepository

log = logging.getLogger(__name__)

EXPLICIT = "explicit"


class RepositoryControl:
    def __init__(self, repository: ModelRepository, control_mode: str) -> None:
        self.repository = repository
        self.control_mode = control_mode

    async def RepositoryIndex(self, request, context):
        response = protocol.RepositoryIndexResponse()
        for name, version, state, reason in self.repository.index():
            if request.ready and state != READY:
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def RepositoryModelLoad(self, request, context):
        name = request.model_name
        self._allowed("load", name)
        parameters = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in request.parameters.items()}
        config, files = parse_load_parameters(name, parameters)
        log.info("load of model '%s' requested%s", name, _described(config, files))
        await self.repository.load(name, config, files)
        return protocol.response_class("RepositoryModelLoad")()

    async def RepositoryModelUnload(self, request, context):
        self._allowed("unload", request.model_name)
        log.info("unload of model '%s' requested", request.model_name)
        await self.repository.unload(request.model_name)
        return protocol.response_class("RepositoryModelUnload")()

    def _allowed(self, action: str, name: str) -> None:
        if self.control_mode == EXPLICIT:
            return
        why = {
            "none": "the models were loaded at start and stay as they are",
            "poll": "the server follows the repository's files; change those instead",
        }[self.control_mode]
        raise ControlDisabled(
            f"failed to {action} '{name}': explicit model {action} is not allowed with "
            f"--model-control-mode {self.control_mode} ({why}); start the server with --model-control-mode explicit"
        )


def _described(config: str | None, files: dict[str, bytes]) -> str:
    parts = []
    if config is not None:
        parts.append(f"config {config[:200]}")
    if files:
        parts.append(f"{len(files)} file(s) ({sum(len(content) for content in files.values())} bytes)")
    return f" with {' and '.join(parts)}" if parts else ""
