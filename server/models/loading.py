"""Loading one model version: its sessions, the configuration completed from the graph,
calibration, warm-up and a batcher. The blocking parts run in worker threads, so the versions
already serving keep serving while a new one loads beside them, within the load's deadline
(load_deadline.py: --model-load-timeout-secs, an unload, shutdown)."""

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from server.engine import sequence_state
from server.engine.batching import Batcher
from server.engine.placement import GpuPolicy
from server.engine.providers import engine_cache_dir, profile_shapes
from server.engine.runtime import InstancePool, graph_input_shapes
from server.engine.sequences import Sequences, same_state
from server.errors import ConfigError
from server.models import warmup
from server.models.load_deadline import LoadDeadline
from server.models.model_config import BatchingSettings, ModelSettings, TensorConfig
from server.models.sequence_config import DIRECT, SequenceSettings
from server.observe.events import EventBus, ModelStateChanged
from server.tensors import Signature, TensorSpec

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


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
    sequences: Sequences | None = None  # with sequence_batching: what routes its requests to the batcher
    load_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"model '{self.name}' version {self.version}"


async def load_version(
    name: str,
    version: str,
    settings: ModelSettings,
    model_dir: Path,
    default_max_batch_size: int,
    bus: EventBus,
    gpu: GpuPolicy,
    deadline: LoadDeadline,
) -> ModelVersion:
    """A version ready to serve, not yet announced; raises ConfigError (sessions closed, or closed by the
    step still running when the load was given up) when it cannot load in time."""
    loaded = ModelVersion(name, version)
    path = model_dir / version / settings.model_filename
    if not path.resolve().is_relative_to((model_dir / version).resolve()):
        raise ConfigError(f"{settings.source}: default_model_filename: {path} is outside {model_dir / version}")
    if not path.is_file():
        raise ConfigError(f"{path}: model file not found")
    started = time.perf_counter()
    profiles = await deadline.run("reading the model", tensorrt_profiles, settings, path, default_max_batch_size)
    gpu = dataclasses.replace(gpu, tensorrt_profiles=profiles)
    if _wants_tensorrt(settings) and gpu.tensorrt_cache_dir is not None:
        cache_dir, hardware = gpu.tensorrt_cache_dir, gpu.hardware
        cache = await deadline.run("hashing the model", engine_cache_dir, cache_dir, path, hardware, ort.__version__)
        gpu = dataclasses.replace(gpu, tensorrt_cache_dir=cache)
    opening = (InstancePool, path, settings.session, loaded.label, gpu)
    pool = await deadline.run("opening sessions", *opening, cleanup=InstancePool.close)
    pool.load_check = deadline.check  # calibration and warm-up stop between two runs once the load is given up
    try:
        completed, signature = complete_settings(settings, pool, default_max_batch_size, version)
        await deadline.run("binding", pool.bind_batch_sizes, completed.batching, signature)  # CUDA graphs' padded sizes
        choice = await deadline.run(
            "calibration", pool.calibrate, signature.run_inputs, completed.batching.max_batch_size
        )
        log.info("%s runs with %s", loaded.label, choice.describe())
        await deadline.run("warm-up", warmup.warm_up, pool, completed, signature, model_dir)
    except BaseException as err:  # a failure, a bug, or a cancelled load: the sessions close either way
        await deadline.release(pool.close)
        if isinstance(err, (ConfigError, asyncio.CancelledError)) or not isinstance(err, Exception):
            raise
        log.exception("%s: unexpected failure while loading", loaded.label)
        raise ConfigError(
            f"{loaded.label}: unexpected failure while loading ({type(err).__name__}); see the server log"
        ) from err
    del pool.load_check  # loaded: its runs are no longer the load's to stop
    loaded.batcher = Batcher(pool.run, completed.batching, pool.instance_count, name, version, bus, pool.devices)
    loaded.batcher.start()
    if completed.sequence is not None:
        initial = sequence_state.initial_states(completed.sequence, model_dir, completed.max_batch_size)
        loaded.sequences = Sequences(completed.sequence, loaded.batcher, initial, bus)
        if completed.sequence.states:
            where = (
                "on each instance's device"
                if pool.keep_on_device(completed.sequence.state_outputs)
                else "in host memory"
            )
            log.info("%s: sequences' implicit state kept %s", loaded.label, where)
    loaded.settings, loaded.signature, loaded.pool = completed, signature, pool
    loaded.state, loaded.load_seconds = READY, time.perf_counter() - started
    _log_loaded(loaded)
    return loaded


def _wants_tensorrt(settings: ModelSettings) -> bool:
    return any(accelerator.name == "tensorrt" for accelerator in settings.session.gpu_accelerators)


def tensorrt_profiles(settings: ModelSettings, path: Path, default_max_batch_size: int) -> dict[str, str]:
    """TensorRT optimisation profiles, so that the engine is built at load: the graph's inputs, with
    the dims config.pbtxt fixes, from batch 1 to max_batch_size. Blocking (reads the model file)."""
    if not _wants_tensorrt(settings):
        return {}
    shapes = graph_input_shapes(path)
    batchable = all(shape and shape[0] == -1 for shape in shapes.values())
    max_batch = (
        settings.max_batch_size if settings.max_batch_size is not None else (default_max_batch_size if batchable else 0)
    )
    declared = {tensor.name: (-1, *tensor.dims) for tensor in settings.inputs}
    specs = [TensorSpec(name, "", declared.get(name, shape)) for name, shape in shapes.items()]
    return profile_shapes(specs, max_batch)


def ready_event(model: ModelVersion) -> ModelStateChanged:
    batcher, pool = model.batcher, model.pool
    return ModelStateChanged(
        model.name,
        model.version,
        True,
        pool.provider,
        queue_capacity=model.settings.batching.queue_policy.max_queue_size,
        devices=pool.devices,
        queue_depth=lambda: batcher.depth,
        load_seconds=model.load_seconds,
    )


async def retire(model: ModelVersion) -> None:
    """Answer every request the version accepted, then close its sessions. Its sequences end, unless
    a reload took them over (hand_over_sequences)."""
    if model.sequences is not None:
        model.sequences.close(f"{model.label} stopped serving (unloaded, or the server is stopping)")
    await model.batcher.close()
    await asyncio.to_thread(model.pool.close)


def hand_over_sequences(previous: ModelVersion, version: ModelVersion) -> None:
    """A reload: `version` goes on with `previous`'s sequences if their state is the same; else those
    end now, and a later request of one is told why."""
    old, new = previous.sequences, version.sequences
    if old is None or new is None:
        return
    if same_state(old.settings, new.settings):
        old.adopt(version.batcher, new.initial)
        version.sequences, previous.sequences = old, None
        return
    reason = f"{version.label} was reloaded with another state signature (controls or states changed)"
    new.inherit_ended(old.keys(), reason)
    old.close(reason)


def _log_loaded(model: ModelVersion) -> None:
    settings, signature, pool = model.settings, model.signature, model.pool
    batching = settings.batching
    log.info(
        "%s loaded in %.2f s: inputs %s, outputs %s, provider %s on %s, %d instance(s) x %d intra-op thread(s), "
        "max_batch_size %d, max_queue_delay %d us, preferred sizes %s, max_queue_size %d, priority levels %d",
        model.label,
        model.load_seconds,
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
    max_batch = _max_batch_size(settings, pool, default_max_batch_size)
    sequence = _sequence(settings, pool, max_batch)
    hidden_inputs = set(sequence.hidden_inputs) if sequence else set()
    hidden_outputs = set(sequence.state_outputs) if sequence else set()
    callers_inputs = tuple(spec for spec in pool.inputs if spec.name not in hidden_inputs)
    callers_outputs = tuple(spec for spec in pool.outputs if spec.name not in hidden_outputs)
    inputs = _merge(settings.inputs, callers_inputs, max_batch, f"{where}: input")
    outputs = _merge(settings.outputs, callers_outputs, max_batch, f"{where}: output")
    for size in settings.batching.preferred_batch_sizes:
        if size > max_batch:
            raise ConfigError(
                f"{where}: dynamic_batching.preferred_batch_size: {size} exceeds max_batch_size {max_batch}"
            )
    batching = dataclasses.replace(settings.batching, max_batch_size=max_batch)
    if sequence:
        batching = sequence_batching(batching, sequence)
    completed = dataclasses.replace(
        settings, max_batch_size=max_batch, inputs=inputs, outputs=outputs, batching=batching, sequence=sequence
    )
    batch_dim = (-1,) if max_batch else ()
    signature = Signature(
        model=settings.name,
        version=version,
        inputs=tuple(TensorSpec(t.name, t.datatype, batch_dim + t.dims) for t in inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, batch_dim + t.dims) for t in outputs),
        max_batch_size=max_batch,
        hidden=tuple(spec for spec in pool.inputs if spec.name in hidden_inputs),
    )
    return completed, signature


def _max_batch_size(settings: ModelSettings, pool: InstancePool, default_max_batch_size: int) -> int:
    """config.pbtxt's, else the default where every tensor has a variable first dimension, else 0."""
    graph = pool.inputs + pool.outputs
    batchable = all(len(s.shape) >= 1 and s.shape[0] == -1 for s in graph)
    max_batch = settings.max_batch_size
    if max_batch is None:
        return default_max_batch_size if batchable else 0
    if max_batch > 0 and not batchable:
        fixed = next(s for s in graph if not s.shape or s.shape[0] != -1)
        raise ConfigError(
            f"{settings.source}: max_batch_size: {max_batch}, but the model's tensor '{fixed.name}' has shape "
            f"{list(fixed.shape)} with no variable first dimension to batch on"
        )
    return max_batch


def _sequence(settings: ModelSettings, pool: InstancePool, max_batch: int) -> SequenceSettings | None:
    """sequence_batching with Triton's defaults for this max_batch_size, checked against the graph."""
    if settings.sequence is None:
        return None
    sequence = settings.sequence.completed(max_batch)
    sequence_state.check_graph(sequence, pool.inputs, pool.outputs)
    if pool.graphs:  # its bindings hold the caller's inputs only; a sequence's would need theirs too
        raise ConfigError(f"{settings.source}: enable_cuda_graph with sequence_batching is not supported yet")
    return sequence


def sequence_batching(batching: BatchingSettings, sequence: SequenceSettings) -> BatchingSettings:
    """A sequence model's batcher: the strategy's delay and preferred sizes in place of dynamic_batching's.
    `direct` with a delay runs a batch once `minimum_slot_utilization` of an instance's slots have a
    request ready (at least one: Triton's default 0 waits for nothing), else when the delay is up:
    every size from there up is preferred. Without a delay, the adaptive one batches what overlaps."""
    preferred = tuple(s for s in sequence.preferred_batch_sizes if s <= batching.max_batch_size)
    if sequence.strategy == DIRECT and sequence.max_queue_delay_us:
        least = max(1, math.ceil(sequence.minimum_slot_utilization * batching.max_batch_size))
        preferred = tuple(range(least, batching.max_batch_size + 1))
    return dataclasses.replace(
        batching, max_queue_delay_us=sequence.max_queue_delay_us, preferred_batch_sizes=preferred
    )


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
