"""The model repository: <repo>/<model>/<version>/model.onnx, Triton's layout.

Knows which versions of which models serve, and changes that while serving: a load
or reload builds the new versions beside the old ones (loading.py) and swaps them in
at once; the versions it replaces answer what they accepted, then close. A reload
that fails leaves what served before serving."""

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.placement import GpuPolicy
from server.errors import ConfigError, LoadFailed, ModelNotFound, ModelNotReady
from server.models import overrides
from server.models.load_deadline import LoadThreads
from server.models.loading import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    ModelVersion,
    hand_over_sequences,
    load_version,
    ready_event,
    retire,
)
from server.models.model_config import ModelSettings, load_model_settings, settings_from_json
from server.models.model_limits import MAX_VERSIONS, at_most
from server.models.names import check_model_name, check_version, is_model_name
from server.observe.events import EventBus, ModelStateChanged, RepositoryChanged

log = logging.getLogger(__name__)

__all__ = ["READY", "UNAVAILABLE", "LOADING", "UNLOADING", "ModelRepository", "ModelVersion"]
NOT_LOADED = "not loaded"
# At shutdown, past the exit timeout: how long loads given up and batchers draining still get. A
# given-up load fails at once (its loop side stops waiting), so this is slack, not work.
GIVE_UP_SECONDS = 1.0


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    state: str = UNAVAILABLE  # READY while its last load serves (a failed reload keeps the old one serving)
    reason: str = NOT_LOADED
    wanted: bool = False  # loaded at start, or served since, and not unloaded: counts for the server's readiness
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    given_up: str = ""  # why a load under way stops before its next version (an unload waits for the lock)

    def serving(self) -> dict[str, ModelVersion]:
        return {number: version for number, version in self.versions.items() if version.state == READY}


class ModelRepository:
    def __init__(
        self,
        root: Path,
        default_max_batch_size: int,
        bus: EventBus,
        gpu: GpuPolicy = GpuPolicy(),
        load_timeout_secs: float = 1800.0,
        default_max_queue_size: int = 0,
        names_in_errors: bool = True,
    ) -> None:
        self.root = root
        self.default_max_batch_size = default_max_batch_size
        self.default_max_queue_size = default_max_queue_size  # for configs that leave the queue unbounded
        self.gpu = gpu
        self.bus = bus
        self.loads = LoadThreads(load_timeout_secs)  # each version's load within --model-load-timeout-secs
        self.models: dict[str, ModelEntry] = {}
        self.loaded = False  # the start-up loads are done
        # NOT_FOUND lists the loaded models (or a model's versions), as Triton's does; off with
        # --api-keys: a key of one tenant must not learn every model's name by asking for a wrong one.
        self.names_in_errors = names_in_errors
        self._changes: set[asyncio.Task] = set()  # loads and unloads under way

    # --- lookups ------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version asked for, or the latest ready one; raises ModelNotFound/ModelNotReady."""
        entry = self.models.get(name)
        if entry is None:
            check_model_name(name)  # only here: a name that serves was checked as it loaded
            loaded = sorted(n for n, e in self.models.items() if e.wanted)
            listed = f"; loaded models: {loaded}" if self.names_in_errors else ""
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found{listed}")
        if version:
            found = entry.versions.get(version)
            if found is None:
                check_version(version)
                listed = f"; versions: {self.version_names(name)}" if self.names_in_errors else ""
                raise ModelNotFound(f"Request for unknown model: '{name}' version {version} is not found{listed}")
            if found.state != READY:
                raise ModelNotReady(f"model '{name}' version {version} is {found.state}: {found.reason}")
            return found
        ready = entry.serving()
        if not ready:
            reason = entry.reason or "; ".join(v.reason for v in entry.versions.values() if v.reason)
            raise ModelNotReady(f"model '{name}' has no ready version ({entry.state}): {reason}")
        return ready[max(ready, key=int)]

    def version_names(self, name: str) -> list[str]:
        return sorted(self.models[name].versions, key=int)

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def all_ready(self) -> bool:
        return self.loaded and all(entry.state == READY for entry in self.models.values() if entry.wanted)

    def discover(self) -> list[str]:
        """Model directories in the repository now."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every version known and every model directory."""
        rows = []
        for name in sorted(set(self.discover()) | set(self.models)):
            entry = self.models.get(name)
            if entry is None or not entry.versions:
                rows.append((name, "", entry.state if entry else UNAVAILABLE, entry.reason if entry else NOT_LOADED))
                continue
            for number in self.version_names(name):
                version = entry.versions[number]
                reason = version.reason or (entry.reason if version.state == READY else "")
                rows.append((name, number, version.state, reason))
        return rows

    # --- loading and unloading ------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        """Start-up: load `names` (every model directory when None); failures are logged, not raised."""
        for name in self.discover() if names is None else names:
            self.models.setdefault(name, ModelEntry(name)).wanted = True  # counts for readiness, loaded or not
            try:
                await self.load(name)
            except (LoadFailed, ModelNotFound) as err:
                log.error("%s", err)
        self.loaded = True

    async def load(self, name: str, config: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """Load `name`, or reload it beside what serves now. `config` (JSON ModelConfig) replaces
        config.pbtxt for this load; `files` (relative path -> bytes) replace the model's directory.
        Raises ModelNotFound, InvalidInput (a bad parameter) or LoadFailed."""
        await self._to_the_end(name, self._load_request(name, config, files))

    async def unload(self, name: str) -> None:
        """New requests are refused at once; accepted ones are answered; then the sessions close."""
        await self._to_the_end(name, self._unload(name))

    async def _to_the_end(self, name: str, change) -> None:
        """Run a change to its end even when its caller goes away (a cancelled RPC, shutdown):
        a change stopped halfway would leave versions loading forever and sessions open."""
        task = asyncio.create_task(change)
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # reported by the caller or the log
        task.add_done_callback(lambda _: self.bus.publish(RepositoryChanged(name)))
        await asyncio.shield(task)

    async def _load_request(self, name: str, config: str | None, files: dict[str, bytes] | None) -> None:
        if files:
            overrides.check_files(name, files, config)
            root = await asyncio.to_thread(overrides.write_private_copy, name, files)
            try:
                await self._load(name, root / name, config)
            finally:
                await asyncio.to_thread(overrides.remove_private_copy, root)
            return
        model_dir = self.root / name
        if not is_model_name(name) or not model_dir.is_dir():
            raise ModelNotFound(
                f"failed to load '{name}': Request for unknown model: no directory '{name}' in the model repository {self.root}"
            )
        await self._load(name, model_dir, config)

    async def _load(self, name: str, model_dir: Path, config: str | None) -> None:
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            try:  # a thread: the file may be large or on a slow disk, the directory may hold thousands of versions
                settings, chosen = await asyncio.to_thread(_read_config, name, model_dir, config)
                settings = _bounded_queue(settings, self.default_max_queue_size)
            except ConfigError as err:
                raise self._failure(entry, str(err)) from None
            loaded, failures = await self._load_versions(entry, settings, model_dir, chosen)
            if failures and entry.serving():
                await self._keep_serving(entry, loaded, failures)
            else:
                await self._switch(entry, loaded, failures)

    async def _load_versions(
        self, entry: ModelEntry, settings: ModelSettings, model_dir: Path, chosen: list[str]
    ) -> tuple[dict[str, ModelVersion], dict[str, str]]:
        loaded, failures = {}, {}
        for number in chosen:
            if number not in entry.versions or entry.versions[number].state == UNAVAILABLE:  # a retry shows LOADING too
                entry.versions[number] = ModelVersion(entry.name, number, reason="loading")
            try:
                if entry.given_up:
                    raise ConfigError(f"{entry.versions[number].label}: the load was given up: {entry.given_up}")
                with self.loads.deadline(entry.name, entry.versions[number].label) as deadline:
                    loaded[number] = await load_version(
                        entry.name,
                        number,
                        settings,
                        model_dir,
                        self.default_max_batch_size,
                        self.bus,
                        self.gpu,
                        deadline,
                    )
            except ConfigError as err:
                failures[number] = str(err)
                # %r: a load request's config is the caller's text, and its messages quote it
                log.error("model '%s' version %s failed to load: %r", entry.name, number, str(err))
                if entry.versions[number].state != READY:
                    self.bus.publish(ModelStateChanged(entry.name, number, False, "none", str(err)))
        return loaded, failures

    async def _switch(self, entry: ModelEntry, loaded: dict[str, ModelVersion], failures: dict[str, str]) -> None:
        """Swap in what loaded, in one step; what it replaces and what left the version policy
        answer their accepted requests, then close."""
        before = entry.serving()
        departing = [version for number, version in before.items() if number not in loaded]
        versions = {number: version for number, version in entry.versions.items() if version.state == UNAVAILABLE}
        versions.update(
            {number: ModelVersion(entry.name, number, UNAVAILABLE, reason) for number, reason in failures.items()}
        )
        versions.update({version.version: version for version in departing})
        versions.update(loaded)
        entry.versions = versions  # from here on, new requests go to the new versions
        _hand_over(before, loaded)
        if failures:
            entry.state = UNAVAILABLE  # a first load that failed in part: what loaded serves, the model is not ready
        else:
            entry.state, entry.reason, entry.wanted = READY, "", True
        for version in loaded.values():
            self.bus.publish(ready_event(version))
        for version in departing:
            version.state, version.reason = UNLOADING, "no longer in the version policy"
        await asyncio.gather(*(retire(version) for version in before.values()))
        for version in before.values():
            version.state = UNAVAILABLE
        for version in departing:
            self.bus.publish(_unready_event(version))
        if before:
            log.info(
                "model '%s': versions %s serve now, in place of %s",
                entry.name,
                sorted(loaded, key=int),
                sorted(before, key=int),
            )
        if failures:
            raise self._failure(entry, _describe(failures))

    async def _keep_serving(self, entry: ModelEntry, loaded: dict[str, ModelVersion], failures: dict[str, str]) -> None:
        """A reload failed: drop what it loaded; what served before keeps serving."""
        await asyncio.gather(*(retire(version) for version in loaded.values()))
        for number in list(entry.versions):
            if entry.versions[number].state == LOADING:
                del entry.versions[number]
        for number, reason in failures.items():
            entry.versions.setdefault(number, ModelVersion(entry.name, number, UNAVAILABLE, reason))
        raise self._failure(entry, _describe(failures))

    def _failure(self, entry: ModelEntry, reason: str) -> LoadFailed:
        """Record why a load failed; versions that serve keep serving."""
        serving = sorted(int(number) for number in entry.serving())
        if serving and entry.state == READY:
            entry.reason = f"reload failed, versions {serving} keep serving: {reason}"
        else:
            entry.state, entry.reason = UNAVAILABLE, reason
        return LoadFailed(f"failed to load '{entry.name}': {entry.reason}")

    async def _unload(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is None:
            if name in self.discover():
                return  # never loaded: nothing to do
            raise ModelNotFound(f"failed to unload '{name}': Request for unknown model: '{name}' is not found")
        if entry.lock.locked():  # a load under way: it fails now, not when its warm-up would end
            entry.given_up = "the model was unloaded"
            self.loads.stop(entry.given_up, name)
        async with entry.lock:
            entry.given_up = ""
            entry.wanted = False
            serving = list(entry.serving().values())
            for version in serving:
                version.state, version.reason = UNLOADING, "unloaded"
            entry.state, entry.reason = UNAVAILABLE, "unloaded"
            await asyncio.gather(*(retire(version) for version in serving))
            for version in serving:
                version.state, version.reason = UNAVAILABLE, "unloaded"
                self.bus.publish(_unready_event(version))
        if serving:
            log.info("model '%s' unloaded (versions %s)", name, sorted(v.version for v in serving))

    async def close(self, timeout: float) -> list[str]:
        """Shutdown within `timeout` seconds: loads and unloads under way may finish until then, and
        loads are given up after; every batcher drains, then the sessions close. Returns what still
        runs when the time is up (a given-up load's step, a batch), for the exit to report."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        if self._changes:
            _, pending = await asyncio.wait(set(self._changes), timeout=timeout)  # their failures are logged
            if pending:
                log.warning("shutdown: giving up %d model load(s) still under way", len(pending))
                for entry in self.models.values():
                    entry.given_up = "the server is shutting down"
                self.loads.stop("the server is shutting down")
                await asyncio.wait(pending, timeout=max(GIVE_UP_SECONDS, ends - loop.time()))
        versions = [version for entry in self.models.values() for version in entry.serving().values()]
        retiring = {asyncio.create_task(retire(version)): version for version in versions}
        late = set()
        if retiring:
            _, late = await asyncio.wait(retiring, timeout=max(GIVE_UP_SECONDS, ends - loop.time()))
        for version in versions:
            version.state, version.reason = UNAVAILABLE, "server shut down"
        steps = await self.loads.settled(max(0.0, ends - loop.time()))
        return steps + [f"{retiring[task].label}: a batch" for task in late]


def _hand_over(before: dict[str, ModelVersion], loaded: dict[str, ModelVersion]) -> None:
    """Each loaded version takes over the sequences of the one it replaces: the same number, or for
    the newest, the newest before (where requests that name no version went)."""
    if not before or not loaded:
        return
    newest_before, newest = max(before, key=int), max(loaded, key=int)
    for number, version in loaded.items():
        previous = before.get(number) or (before[newest_before] if number == newest else None)
        if previous is not None:
            hand_over_sequences(previous, version)


def _bounded_queue(settings: ModelSettings, default_max_queue_size: int) -> ModelSettings:
    """max_queue_size 0 (Triton's unbounded) becomes --default-max-queue-size: every queued request
    holds its tensors, and a stream can queue requests without waiting for their answers."""
    policy = settings.batching.queue_policy
    if policy.max_queue_size or not default_max_queue_size:
        return settings
    bounded = dataclasses.replace(policy, max_queue_size=default_max_queue_size)
    batching = dataclasses.replace(settings.batching, queue_policy=bounded)
    return dataclasses.replace(settings, batching=batching)


def _read_config(name: str, model_dir: Path, config: str | None) -> tuple[ModelSettings, list[str]]:
    """The model's settings and the versions they choose; blocking."""
    settings = settings_from_json(config, name) if config is not None else load_model_settings(model_dir)
    return settings, _chosen_versions(settings, model_dir)


def _chosen_versions(settings: ModelSettings, model_dir: Path) -> list[str]:
    available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)]
    chosen = settings.version_policy.select(available)
    if not chosen:
        found = sorted(available)
        listed = found if len(found) <= 20 else [*found[:10], "...", *found[-10:]]
        raise ConfigError(
            f"{model_dir}: no version directory matches the version policy "
            f"({settings.version_policy.kind}); found {listed}"
        )
    field_name = f"version_policy {settings.version_policy.kind} (versions chosen)"
    at_most(len(chosen), MAX_VERSIONS, settings.source, field_name)
    return [str(number) for number in chosen]


def _is_version(name: str) -> bool:
    """Numeric directory names within Triton's int64; Triton ignores those starting with 0."""
    return name.isascii() and name.isdigit() and not name.startswith("0") and int(name) < 2**63


def _describe(failures: dict[str, str]) -> str:
    return "; ".join(f"version {number}: {reason}" for number, reason in sorted(failures.items()))


def _unready_event(version: ModelVersion) -> ModelStateChanged:
    return ModelStateChanged(version.name, version.version, False, version.pool.provider, version.reason)
