"""The model repository: <repo>/<model>/<version>/model.onnx, Triton's layout.

Discovers models, applies version policies, completes each configuration
from its ONNX graph, loads and warms up instance pools, starts batchers, and
answers lookups with the model's state."""

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from server.batching import Batcher
from server.config import ModelSettings, TensorConfig, load_model_settings
from server.errors import ConfigError, ModelNotFound, ModelNotReady
from server.events import EventBus, ModelStateChanged
from server.runtime import InstancePool
from server.tensors import Signature, TensorSpec

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


@dataclass
class ModelVersion:
    name: str
    version: str
    state: str = LOADING
    reason: str = ""
    settings: ModelSettings | None = None  # completed from the graph
    signature: Signature | None = None
    pool: InstancePool | None = None
    batcher: Batcher | None = None


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    state: str = LOADING  # of the model as a whole: UNAVAILABLE when its config or layout is broken
    reason: str = ""


class ModelRepository:
    def __init__(self, root: Path, default_max_batch_size: int, bus: EventBus) -> None:
        self.root = root
        self.default_max_batch_size = default_max_batch_size
        self.bus = bus
        self.models: dict[str, ModelEntry] = {}
        self.loaded = False

    # --- lookups ------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version asked for, or the latest ready one; raises ModelNotFound/ModelNotReady."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model '{name}' is not in the repository; models: {sorted(self.models)}")
        if version:
            found = entry.versions.get(version)
            if found is None:
                raise ModelNotFound(f"model '{name}' has no version {version}; versions: {self.version_names(name)}")
            if found.state != READY:
                raise ModelNotReady(f"model '{name}' version {version} is {found.state}: {found.reason}")
            return found
        ready = [v for v in entry.versions.values() if v.state == READY]
        if not ready:
            reason = entry.reason or "; ".join(v.reason for v in entry.versions.values() if v.reason)
            raise ModelNotReady(f"model '{name}' has no ready version ({entry.state}): {reason}")
        return max(ready, key=lambda v: int(v.version))

    def version_names(self, name: str) -> list[str]:
        return sorted(self.models[name].versions, key=int)

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def all_ready(self) -> bool:
        return self.loaded and all(
            entry.state == READY and all(v.state == READY for v in entry.versions.values())
            for entry in self.models.values()
        )

    # --- loading ------------------------------------------------------------------------------

    async def load_all(self) -> None:
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = ModelEntry(model_dir.name)
            self.models[entry.name] = entry
            try:
                await self._load_model(entry, model_dir)
            except ConfigError as err:
                entry.state, entry.reason = UNAVAILABLE, str(err)
                log.error("model '%s' failed to load: %s", entry.name, err)
        self.loaded = True

    async def _load_model(self, entry: ModelEntry, model_dir: Path) -> None:
        settings = load_model_settings(model_dir)
        available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)]
        chosen = settings.version_policy.select(available)
        if not chosen:
            raise ConfigError(
                f"{model_dir}: no version directory matches the version policy "
                f"({settings.version_policy.kind}); found {sorted(available)}"
            )
        for number in chosen:
            version = ModelVersion(entry.name, str(number))
            entry.versions[version.version] = version
            await self._load_version(version, settings, model_dir / str(number) / settings.model_filename)
        failed = [v for v in entry.versions.values() if v.state != READY]
        entry.state = UNAVAILABLE if failed else READY
        entry.reason = "; ".join(v.reason for v in failed)

    async def _load_version(self, version: ModelVersion, settings: ModelSettings, path: Path) -> None:
        label = f"model '{version.name}' version {version.version}"
        try:
            if not path.is_file():
                raise ConfigError(f"{path}: model file not found")
            pool = await asyncio.to_thread(InstancePool, path, settings.session, label)
            try:
                completed, signature = complete_settings(settings, pool, self.default_max_batch_size, version.version)
                choice = await asyncio.to_thread(pool.calibrate, signature.inputs, completed.batching.max_batch_size)
                log.info("%s runs with %s", label, choice.describe())
                await asyncio.to_thread(pool.warm_up, signature.inputs)
            except ConfigError:
                pool.close()
                raise
        except ConfigError as err:
            version.state, version.reason = UNAVAILABLE, str(err)
            log.error("%s failed to load: %s", label, err)
            self.bus.publish(ModelStateChanged(version.name, version.version, False, "none", str(err)))
            return
        batcher = Batcher(
            pool.run, completed.batching, pool.instance_count, version.name, version.version, self.bus, pool.devices
        )
        batcher.start()
        version.settings, version.signature, version.pool, version.batcher = completed, signature, pool, batcher
        version.state = READY
        _log_loaded(label, completed, signature, pool)
        capacity = completed.batching.queue_policy.max_queue_size
        self.bus.publish(
            ModelStateChanged(
                version.name, version.version, True, pool.provider,
                queue_capacity=capacity, devices=pool.devices, queue_depth=lambda: batcher.depth,
            )  # fmt: skip
        )

    async def close(self) -> None:
        """Drain every batcher, then close the sessions."""
        versions = [v for entry in self.models.values() for v in entry.versions.values() if v.batcher]
        await asyncio.gather(*(v.batcher.close() for v in versions))
        for version in versions:
            version.pool.close()
            version.state = UNAVAILABLE
            version.reason = "server shut down"


def _is_version(name: str) -> bool:
    """Numeric directory names; Triton ignores those starting with 0."""
    return name.isdigit() and not name.startswith("0")


def _log_loaded(label: str, settings: ModelSettings, signature: Signature, pool: InstancePool) -> None:
    batching = settings.batching
    log.info(
        "%s loaded: inputs %s, outputs %s, provider %s on %s, %d instance(s) x %d intra-op thread(s), "
        "max_batch_size %d, max_queue_delay %d us, preferred sizes %s, max_queue_size %d, priority levels %d",
        label,
        [(s.name, s.datatype, list(s.shape)) for s in signature.inputs],
        [(s.name, s.datatype, list(s.shape)) for s in signature.outputs],
        pool.provider,
        pool.device,
        pool.instance_count,
        pool.intra_op_threads,
        batching.max_batch_size,
        batching.max_queue_delay_us,
        list(batching.preferred_batch_sizes),
        batching.queue_policy.max_queue_size,
        batching.priority_levels,
    )


# --- completing a configuration from the graph ------------------------------------------------


def complete_settings(
    settings: ModelSettings, pool: InstancePool, default_max_batch_size: int, version: str
) -> tuple[ModelSettings, Signature]:
    """Merge config.pbtxt (possibly empty) with the graph; ConfigError on any disagreement."""
    where = settings.source
    graph = pool.inputs + pool.outputs
    batchable = all(len(s.shape) >= 1 and s.shape[0] == -1 for s in graph)
    max_batch = settings.max_batch_size
    if max_batch is None:
        max_batch = default_max_batch_size if batchable else 0
    elif max_batch > 0 and not batchable:
        fixed = next(s for s in graph if not s.shape or s.shape[0] != -1)
        raise ConfigError(
            f"{where}: max_batch_size: {max_batch}, but the model's tensor '{fixed.name}' has shape "
            f"{list(fixed.shape)} with no variable first dimension to batch on"
        )
    inputs = _merge(settings.inputs, pool.inputs, max_batch, f"{where}: input")
    outputs = _merge(settings.outputs, pool.outputs, max_batch, f"{where}: output")
    for size in settings.batching.preferred_batch_sizes:
        if size > max_batch:
            raise ConfigError(
                f"{where}: dynamic_batching.preferred_batch_size: {size} exceeds max_batch_size {max_batch}"
            )
    batching = dataclasses.replace(settings.batching, max_batch_size=max_batch)
    completed = dataclasses.replace(settings, max_batch_size=max_batch, inputs=inputs, outputs=outputs, batching=batching)
    batch_dim = (-1,) if max_batch else ()
    signature = Signature(
        model=settings.name,
        version=version,
        inputs=tuple(TensorSpec(t.name, t.datatype, batch_dim + t.dims) for t in inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, batch_dim + t.dims) for t in outputs),
        max_batch_size=max_batch,
    )
    return completed, signature


def _merge(
    configured: tuple[TensorConfig, ...], graph: tuple[TensorSpec, ...], max_batch: int, where: str
) -> tuple[TensorConfig, ...]:
    by_name = {spec.name: spec for spec in graph}
    for index, tensor in enumerate(configured):
        if tensor.name not in by_name:
            raise ConfigError(f"{where}[{index}].name: '{tensor.name}' is not in the model; it has {list(by_name)}")
    given = {tensor.name: (index, tensor) for index, tensor in enumerate(configured)}
    merged = []
    for spec in graph:
        dims = spec.shape[1:] if max_batch else spec.shape
        if spec.name not in given:
            merged.append(TensorConfig(spec.name, spec.datatype, dims))
            continue
        index, tensor = given[spec.name]
        _check_agrees(tensor, spec.datatype, dims, f"{where}[{index}]")
        merged.append(tensor)
    return tuple(merged)


def _check_agrees(tensor: TensorConfig, datatype: str, dims: tuple[int, ...], where: str) -> None:
    if tensor.datatype != datatype:
        raise ConfigError(
            f"{where}.data_type: tensor '{tensor.name}' is {tensor.datatype} in the config but {datatype} in the model"
        )
    compatible = len(tensor.dims) == len(dims) and all(g == -1 or c == g for c, g in zip(tensor.dims, dims))
    if not compatible:
        raise ConfigError(
            f"{where}.dims: tensor '{tensor.name}' has dims {list(tensor.dims)} in the config but "
            f"{list(dims)} in the model (batch dimension excluded when max_batch_size > 0)"
        )
