"""Model control: Triton's model repository extension (index, load, unload) as repository calls,
for any transport (the gRPC and REST adapters are thin over it), refused unless
--model-control-mode is explicit."""

import logging

from server.errors import ControlDisabled
from server.models.names import check_model_name
from server.models.overrides import parse_load_parameters
from server.models.repository import READY, ModelRepository

log = logging.getLogger(__name__)

EXPLICIT = "explicit"


class RepositoryControl:
    def __init__(self, repository: ModelRepository, control_mode: str) -> None:
        self.repository = repository
        self.control_mode = control_mode

    async def index(self, ready_only: bool) -> list[dict[str, str]]:
        rows = self.repository.index()
        return [
            {"name": name, "version": version, "state": state, "reason": reason}
            for name, version, state, reason in rows
            if not ready_only or state == READY
        ]

    async def load(self, name: str, parameters: dict[str, object]) -> None:
        """`parameters`: 'config' (str) and 'file:<version>/<name>' (bytes), as Triton takes them."""
        check_model_name(name)  # before anything quotes it: messages, the log, a path
        self._allowed("load", name)
        config, files = parse_load_parameters(name, parameters)
        log.info("load of model '%s' requested%s", name, _described(config, files))
        await self.repository.load(name, config, files)

    async def unload(self, name: str) -> None:
        check_model_name(name)
        self._allowed("unload", name)
        log.info("unload of model '%s' requested", name)
        await self.repository.unload(name)

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
    if config is not None:  # the caller's text: escaped (%r), so that a newline cannot start a log line
        parts.append(f"config {config[:200]!r}")
    if files:
        parts.append(f"{len(files)} file(s) ({sum(len(content) for content in files.values())} bytes)")
    return f" with {' and '.join(parts)}" if parts else ""
