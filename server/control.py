"""Administration over gRPC: the model repository extension's RPCs (RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload) as repository calls, and RPC groups restricted to
callers that send a header (--grpc-restricted-protocol)."""

import hmac
import logging

import grpc

from server import protocol
from server.config import RestrictedProtocol
from server.errors import ControlDisabled, PermissionDenied
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


def restricted(implementation, rule: RestrictedProtocol, streaming: bool):
    """The RPC, refused with PERMISSION_DENIED unless the call carries the rule's metadata."""

    def check(context) -> None:
        given = next((value for key, value in context.invocation_metadata() if key == rule.header), None)
        if given is None or not hmac.compare_digest(str(given).encode(), rule.value.encode()):
            raise PermissionDenied(
                f"this RPC is restricted ({', '.join(rule.groups)}): send the metadata header '{rule.header}' "
                "with the value the server was given in --grpc-restricted-protocol"
            )

    if streaming:

        async def stream(requests, context):
            try:
                check(context)
            except PermissionDenied as err:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            async for answer in implementation(requests, context):
                yield answer

        return stream

    async def call(request, context):
        check(context)
        return await implementation(request, context)

    return call
