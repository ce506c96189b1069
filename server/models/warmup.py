"""Warm-up before a model version serves: Triton's `model_warmup` samples, whose failure fails
the load, or else one best-effort run with zeros per instance. With CUDA graphs, first every padded
batch size's graph is captured on each instance's own thread."""

import logging
from pathlib import Path

import numpy as np

from server.bytes_codec import deserialize_bytes
from server.engine.runtime import InstancePool
from server.errors import ConfigError, ExecutionFailed, InvalidInput
from server.models.model_config import ModelSettings, WarmupInput, WarmupSample
from server.tensors import DATATYPES, Signature, zeros

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"  # <model>/warmup/<input_data_file>, as in Triton
FIX = (
    "to warm it up, give it inputs it accepts with model_warmup in config.pbtxt (Triton's format), e.g. "
    'model_warmup { name: "sample" batch_size: 1 inputs { key: "INPUT" value: { data_type: TYPE_STRING '
    'dims: [1] input_data_file: "INPUT" } } } with the raw tensor in <model>/warmup/INPUT'
)


def warm_up(pool: InstancePool, settings: ModelSettings, signature: Signature, model_dir: Path) -> None:
    """Blocking. Raises ConfigError naming the sample when an explicit warm-up fails."""
    if pool.graphs:
        capture(pool, signature)
    if not settings.warmup:
        try:
            pool.run_everywhere({spec.name: zeros(spec) for spec in signature.run_inputs})
        except ExecutionFailed as err:
            log.warning(
                "%s: automatic warm-up with zeros failed, so it serves unwarmed: %s; %s", signature.label, err, FIX
            )
        return
    for sample in settings.warmup:
        feeds = sample_feeds(sample, signature, model_dir)
        try:
            pool.run_everywhere(feeds, sample.count)
        except ExecutionFailed as err:
            raise ConfigError(
                f"{sample.where} ({sample.name!r}): the model failed on this warm-up sample: {err}"
            ) from None
        log.info("%s: warm-up sample %r ran %d time(s) on each instance", signature.label, sample.name, sample.count)


def capture(pool: InstancePool, signature: Signature) -> None:
    """Every padded size's CUDA graph captured on every instance: the first batch of a size must not
    pay for it. ConfigError when a size cannot run: its graph would fail the first batch instead."""
    try:
        sizes = pool.capture_graphs()
    except ExecutionFailed as err:
        raise ConfigError(
            f"{signature.label}: enable_cuda_graph: capturing the CUDA graphs on zeros failed: {err}"
        ) from None
    shown = list(sizes) or "the fixed shape"
    captured = [instance for instance, device in enumerate(pool.devices) if device != "cpu"]
    if captured:
        log.info(
            "%s: CUDA graphs captured for %d batch size(s) %s on each of instance(s) %s",
            signature.label,
            max(1, len(sizes)),
            shown,
            captured,
        )
    if len(captured) < pool.instance_count:
        log.info(
            "%s: %d padded batch size(s) %s warmed on each CPU instance, no CUDA graph captured (CPUExecutionProvider)",
            signature.label,
            max(1, len(sizes)),
            shown,
        )


def sample_feeds(sample: WarmupSample, signature: Signature, model_dir: Path) -> dict[str, np.ndarray]:
    """The sample's tensors, checked against the model's inputs; ConfigError names the field."""
    specs = signature.input_specs
    given = {item.name for item in sample.inputs}
    if given != set(specs):
        raise ConfigError(
            f"{sample.where}.inputs: the sample has {sorted(given)} but the model's inputs are {sorted(specs)}"
        )
    batching = signature.max_batch_size > 0
    if batching and not 1 <= sample.batch_size <= signature.max_batch_size:
        raise ConfigError(
            f"{sample.where}.batch_size: {sample.batch_size} is outside 1..max_batch_size ({signature.max_batch_size})"
        )
    if not batching and sample.batch_size > 1:
        raise ConfigError(
            f"{sample.where}.batch_size: {sample.batch_size}, but the model does not batch (max_batch_size 0)"
        )
    batch = (sample.batch_size,) if batching else ()
    feeds = {item.name: _tensor(item, batch + item.dims, signature, model_dir, sample.where) for item in sample.inputs}
    feeds.update({spec.name: zeros(spec, max(sample.batch_size, 1)) for spec in signature.hidden})  # a sequence's
    return feeds


def _tensor(item: WarmupInput, shape: tuple[int, ...], signature: Signature, model_dir: Path, where: str) -> np.ndarray:
    field_name = f"{where}.inputs[{item.name!r}]"
    spec = signature.input_specs[item.name]
    if item.datatype != spec.datatype:
        raise ConfigError(f"{field_name}.data_type: {item.datatype}, but the model's input is {spec.datatype}")
    fits = len(shape) == len(spec.shape) and all(want in (-1, got) for want, got in zip(spec.shape, shape))
    if not fits:
        raise ConfigError(
            f"{field_name}.dims: the sample's shape {list(shape)} does not fit the input's {list(spec.shape)}"
        )
    if item.data == "file":
        folder = model_dir / WARMUP_DIR
        path = folder / item.data_file
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ConfigError(f"{field_name}.input_data_file: {path} leads outside {folder}")
        return _from_file(item, shape, path, field_name)
    if item.data == "random":
        return _random(item.datatype, shape)
    if item.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=DATATYPES[item.datatype].numpy)


def _from_file(item: WarmupInput, shape: tuple[int, ...], path: Path, field_name: str) -> np.ndarray:
    try:
        content = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{field_name}.input_data_file: cannot read {path}: {err.strerror}") from None
    count = int(np.prod(shape))
    if item.datatype == "BYTES":
        try:
            return np.array(deserialize_bytes(content, count, str(path)), dtype=object).reshape(shape)
        except InvalidInput as err:
            raise ConfigError(f"{field_name}.input_data_file: {err}") from None
    dtype = np.dtype(DATATYPES[item.datatype].numpy)
    if len(content) != count * dtype.itemsize:
        raise ConfigError(
            f"{field_name}.input_data_file: {path} holds {len(content)} bytes; shape {list(shape)} of "
            f"{item.datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(content, dtype=dtype).reshape(shape)


def _random(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    generator = np.random.default_rng()
    if datatype == "BYTES":
        digits = generator.integers(0, 10**6, size=shape)
        return digits.astype(str).astype(object)
    dtype = np.dtype(DATATYPES[datatype].numpy)
    if dtype.kind == "f":
        return generator.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return generator.integers(0, 2, size=shape).astype(bool)
    return generator.integers(0, 100, size=shape).astype(dtype)
