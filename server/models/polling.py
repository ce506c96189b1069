"""Poll mode: follow the repository's changes while serving.

Every period the repository is scanned; a model whose files (config.pbtxt, version
directories, model files, warm-up data) changed is reloaded, a new one loaded, a removed
one unloaded, through the same path as RepositoryModelLoad. A change is applied only once
it has stood still for one whole period, so a file still being written is not loaded
half-written; names starting with '.' are ignored, so writing `.model.onnx.tmp` and then
renaming it to `model.onnx` is a single change."""

import asyncio
import logging
import os
from pathlib import Path

from server.errors import LoadFailed, ModelNotFound
from server.models.repository import ModelRepository

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int, int], ...]  # per file: relative path, size, mtime, ctime (ns), inode
GONE = None  # a model directory that was removed


def fingerprint(model_dir: Path) -> Fingerprint:
    """What a change to any file of the model changes; blocking (it stats every file)."""
    found = []
    for directory, subdirectories, files in os.walk(model_dir, followlinks=True):  # version dirs may be links
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            path = Path(directory, name)
            relative = str(path.relative_to(model_dir))
            try:
                stat = path.stat()
            except OSError:  # removed since the listing, a dangling or looping link: a state of its own
                found.append((relative, -1, -1, -1, -1))
                continue
            found.append((relative, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))
    return tuple(sorted(found))


class RepositoryPoller:
    def __init__(self, repository: ModelRepository, period: float) -> None:
        self.repository = repository
        self.period = period
        self.applied: dict[str, Fingerprint] = {}  # what the loaded state reflects
        self._pending: dict[str, Fingerprint | None] = {}  # a change seen once, waiting to stand still

    def scan(self) -> dict[str, Fingerprint]:
        """Blocking: every model directory's fingerprint."""
        return {name: fingerprint(self.repository.root / name) for name in self.repository.discover()}

    def start(self, initial: dict[str, Fingerprint]) -> None:
        """`initial`: the scan taken before the start-up loads, which they reflect."""
        self.applied = dict(initial)

    async def run(self) -> None:
        log.info("polling the repository %s every %g s", self.repository.root, self.period)
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.poll_once()
            except Exception:  # a repository that vanished or turned unreadable: keep polling, loudly
                log.exception(
                    "poll: scanning the repository %s failed; trying again in %g s", self.repository.root, self.period
                )

    async def poll_once(self) -> None:
        seen = await asyncio.to_thread(self.scan)
        for name in sorted(set(seen) | set(self.applied)):
            current = seen.get(name, GONE)
            if current == self.applied.get(name, GONE):
                self._pending.pop(name, None)
                continue
            if name not in self._pending or self._pending[name] != current:
                self._pending[name] = current  # still changing, or just changed: wait one more period
                continue
            del self._pending[name]
            self.applied[name] = current
            await self._apply(name, current)

    async def _apply(self, name: str, current: Fingerprint | None) -> None:
        try:
            if current is GONE:
                log.info("poll: model '%s' was removed from the repository: unloading it", name)
                self.applied.pop(name, None)
                await self.repository.unload(name)
            else:
                log.info("poll: model '%s' is new or changed: loading it", name)
                await self.repository.load(name)
        except (LoadFailed, ModelNotFound) as err:  # what served before keeps serving; the log says why
            log.error("poll: %s", err)
