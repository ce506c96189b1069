"""A file the server re-reads while serving whenever it changes (the API keys, the tenant limits):
checked every second by its stat, following symlinks (a Kubernetes Secret or ConfigMap update swaps
one), so an atomic replace is seen at once. A changed file that does not read keeps what was read
before, and the log says why, naming the file and the field."""

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Generic, TypeVar

from server.errors import ConfigError

log = logging.getLogger(__name__)
Contents = TypeVar("Contents")


def stamp(path: str) -> tuple | None:
    """What changes when the file does: its inode, device, modification time and size."""
    try:
        found = os.stat(path)  # follows symlinks: a Secret's ..data swap changes the inode
    except OSError:
        return None
    return found.st_ino, found.st_dev, found.st_mtime_ns, found.st_size


class FollowedFile(Generic[Contents]):
    """`current`: what `read(path)` made of the file last time it read; a ConfigError at start is the
    caller's. `what` names it in the log ("API keys", "tenant limits")."""

    def __init__(self, path: str, read: Callable[[str], Contents], what: str) -> None:
        self.path, self.read, self.what = path, read, what
        self._stamp = stamp(path)  # before the read: a change while reading is read again
        self.current: Contents = read(path)
        self.on_change: list[Callable[[Contents], None]] = []

    async def follow(self, period: float = 1.0) -> None:
        """Re-read on every change until cancelled; each new reading goes to `on_change`."""
        while True:
            await asyncio.sleep(period)
            found = await asyncio.to_thread(stamp, self.path)
            if found == self._stamp:
                continue
            self._stamp = found
            try:
                contents = await asyncio.to_thread(self.read, self.path)
            except ConfigError as err:
                log.error("%s: the changed file is not used, the previous one stays: %s", self.what, err)
                continue
            if contents == self.current:
                continue
            self.current = contents
            log.info("%s: reloaded from %s", self.what, self.path)
            for callback in list(self.on_change):
                try:
                    callback(contents)
                except Exception:  # noqa: BLE001 - one listener's failure must not stop the following
                    log.exception("%s: a listener failed on the reloaded file", self.what)
