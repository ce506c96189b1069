"""onnxruntime's IO binding: inputs and outputs bound on the instance's device. A batch bound per run
(`bound_run`); a fixed shape bound once at fixed addresses (`FixedBinding`); and, for a model whose
CUDA graphs are on, one fixed binding per padded batch size, each replaying its own graph
(`GraphBindings`). A captured CUDA graph replays the addresses it was captured on, and onnxruntime's
CUDA provider keeps its capture state per thread, so a GraphBindings runs only on the one thread
that owns its instance."""

import bisect
import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from server.engine import providers
from server.engine.device_state import DeviceCopies, Gathered
from server.errors import ConfigError
from server.models.model_config import BatchingSettings, SessionSettings
from server.tensors import DATATYPES, Signature, TensorSpec

log = logging.getLogger(__name__)

GRAPH_ID = "gpu_graph_id"  # onnxruntime's run option: the CUDA graph a run captures or replays; -1 = none
# onnxruntime's CUDA provider needs a regular run or two (for its allocations) before it captures a
# graph: three runs per padded size capture every graph, and replay it once, before the model is ready.
GRAPH_CAPTURE_RUNS = 3
# Its count of those regular runs is kept per thread, not per graph id (cuda_execution_provider.h:
# regular_run_count_before_graph_capture_), so after the first size's capture every later size would
# be captured on its very first run, with the arena growing and cuDNN's algorithm search inside the
# capture. Each size first runs this often with gpu_graph_id -1, which captures nothing.
GRAPH_PRIME_RUNS = 2
GRAPH_THREAD = "CUDA graphs replay on the instance's thread"  # why such a model never runs inline
GRAPH_OWN_SESSIONS = "CUDA graphs: only the instances' own sessions run, so nothing is measured on others"


def cuda_graphs_asked(settings: SessionSettings) -> bool:
    """Whether config.pbtxt turns on the cuda accelerator's enable_cuda_graph."""
    return any(providers.flag(dict(a.parameters).get("enable_cuda_graph", "0")) for a in settings.gpu_accelerators)


def padded_sizes(max_batch_size: int, preferred: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The batch sizes a batched model's CUDA graphs are captured at: its preferred sizes, else the
    powers of two below max_batch_size; always max_batch_size itself, so every batch fits one.
    () for a model that does not batch (one binding at its fixed shape)."""
    if max_batch_size <= 0:
        return ()
    if preferred:
        sizes = {size for size in preferred if 1 <= size <= max_batch_size}
    else:
        sizes = {1 << power for power in range(max_batch_size.bit_length())}
    return tuple(sorted({size for size in sizes if size <= max_batch_size} | {max_batch_size}))


@dataclass(frozen=True)
class GraphShapes:
    """What each instance of a pool with CUDA graphs binds: its padded batch sizes (() for a model
    that does not batch) and the completed config's tensors (batch dimension -1)."""

    sizes: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, label: str, batching: BatchingSettings, signature: Signature) -> "GraphShapes":
        """A graph replays one launch per padded size: ConfigError where another dimension varies."""
        batched = signature.max_batch_size > 0
        for spec in signature.inputs + signature.outputs:
            dims = spec.shape[1:] if batched else spec.shape
            if any(dim < 0 for dim in dims):
                raise ConfigError(
                    f"{label}: enable_cuda_graph replays one fixed launch per batch size, so every dimension but the "
                    f"batch needs a fixed size; tensor '{spec.name}' has dims {list(dims)}"
                    f"{'' if batched else ' and max_batch_size is 0'} (fix them with dims in config.pbtxt)"
                )
        sizes = padded_sizes(batching.max_batch_size, batching.preferred_batch_sizes)
        return cls(sizes, signature.inputs, signature.outputs)

    def zeros(self, size: int) -> dict[str, np.ndarray]:
        """Inputs of `size` rows (any size for a model that does not batch), all zeros."""
        shapes = {spec.name: (size, *spec.shape[1:]) if self.sizes else spec.shape for spec in self.inputs}
        return {spec.name: np.zeros(shapes[spec.name], DATATYPES[spec.datatype].numpy) for spec in self.inputs}

    def bind(self, label: str, sessions: list, devices: tuple[str, ...], owners: list[int]) -> list["GraphBindings"]:
        """Each instance's bindings; says loudly where an instance runs on the CPU provider."""
        on_cpu = [instance for instance, device in enumerate(devices) if device == "cpu"]
        if on_cpu:
            log.warning(
                "%s: enable_cuda_graph is on, but instance(s) %s run on CPUExecutionProvider, which captures no CUDA "
                "graph: batches still run padded to sizes %s through fixed bindings on each instance's thread",
                label,
                on_cpu,
                list(self.sizes) or "(the fixed shape)",
            )
        return [GraphBindings(*args, self.inputs, self.outputs, self.sizes) for args in zip(sessions, devices, owners)]


def unbound(session: ort.InferenceSession, output_names: list[str], feeds: dict) -> tuple[list, float]:
    """A graph-enabled instance's run before bind_batch_sizes: its shapes are not known yet."""
    raise RuntimeError("CUDA graphs are on, and bind_batch_sizes has not bound the batch sizes yet")


def bound_run(
    device: str,
    session: ort.InferenceSession,
    output_names: list[str],
    feeds: dict,
    kept: frozenset[str] = frozenset(),
    copies: DeviceCopies | None = None,
) -> tuple[list, float]:
    """session.run through IO binding: each input copied to the instance's device once (a sequence's
    state gathered there from where its last batch left it), each output left where the provider
    allocates it (its shape follows the batch) and copied back once, but for the `kept` ones (state
    outputs), returned as they are: OrtValues on the device (device_state.py)."""
    started = time.perf_counter()
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, Gathered):
            binding.bind_ortvalue_input(name, value.on_device(ort, device, copies, name))
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    kind, _, index = device.partition(":")
    for name in output_names:
        binding.bind_output(name, kind, int(index or 0))
    session.run_with_iobinding(binding)  # onnxruntime synchronizes its providers before it returns
    if kept.isdisjoint(output_names):
        return binding.copy_outputs_to_cpu(), time.perf_counter() - started
    values = [value if name in kept else value.numpy() for name, value in zip(output_names, binding.get_outputs())]
    return values, time.perf_counter() - started


class FixedBinding:
    """A model whose shapes never change: its inputs and outputs live at fixed addresses on the
    instance's device, bound once; each batch updates the inputs in place and copies the outputs
    back once. One per instance (and per padded size), which runs one batch at a time. With a
    `graph_id`, every run carries it as the gpu_graph_id run option (the CPU provider ignores it)."""

    def __init__(
        self, session: ort.InferenceSession, device: str, inputs, outputs, graph_id: int | None = None
    ) -> None:
        kind, _, index = device.partition(":")
        self.binding = session.io_binding()
        self.inputs = {}
        self.dtypes = {spec.name: np.dtype(DATATYPES[spec.datatype].numpy) for spec in inputs}
        for spec in inputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                spec.shape, DATATYPES[spec.datatype].numpy, kind, int(index or 0)
            )
            self.binding.bind_ortvalue_input(spec.name, value)
            self.inputs[spec.name] = value
        self.output_names = [spec.name for spec in outputs]
        self.outputs = {}
        for spec in outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                spec.shape, DATATYPES[spec.datatype].numpy, kind, int(index or 0)
            )
            self.binding.bind_ortvalue_output(spec.name, value)
            self.outputs[spec.name] = value
        self.run_options = None
        if graph_id is not None:
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry(GRAPH_ID, str(graph_id))

    def __call__(self, session: ort.InferenceSession, output_names: list[str], feeds: dict) -> tuple[list, float]:
        started = time.perf_counter()
        for name, array in feeds.items():
            value = self.inputs[name]
            if tuple(array.shape) != tuple(value.shape()) or array.dtype != self.dtypes[name]:
                raise ValueError(
                    f"input '{name}' is {array.dtype}{list(array.shape)}; bound as {self.dtypes[name]}{value.shape()}"
                )
            value.update_inplace(np.ascontiguousarray(array))
        return self.execute(session, output_names), time.perf_counter() - started

    def execute(
        self, session: ort.InferenceSession, output_names: list[str], run_options: ort.RunOptions | None = None
    ) -> list[np.ndarray]:
        """Run on what the inputs hold now; the outputs, copied to the host (each its own array)."""
        session.run_with_iobinding(self.binding, run_options or self.run_options)
        values = dict(zip(self.output_names, self.binding.copy_outputs_to_cpu()))
        return [values[name] for name in output_names]


def _with_rows(specs: tuple[TensorSpec, ...], rows: int) -> list[TensorSpec]:
    return [TensorSpec(spec.name, spec.datatype, (rows, *spec.shape[1:])) for spec in specs]


class GraphBindings:
    """One instance of a model whose CUDA graphs are on: a FixedBinding per padded batch size, each
    with its own gpu_graph_id, so each size's graph replays its own addresses. A batch of N rows
    runs on the smallest size >= N: its rows copied in, the padding rows zeroed (never a previous
    batch's data), and only its N rows of each output returned. No `sizes`: one binding at the
    model's fixed shape (graph 0). Runs only on the thread `owner` (threading.get_ident())."""

    def __init__(self, session, device: str, owner: int, inputs, outputs, sizes: tuple[int, ...]) -> None:
        self.sizes, self.owner = sizes, owner
        if not sizes:
            self.bindings = {0: FixedBinding(session, device, inputs, outputs, graph_id=0)}
        else:
            self.bindings = {
                size: FixedBinding(
                    session, device, _with_rows(inputs, size), _with_rows(outputs, size), graph_id=graph_id
                )
                for graph_id, size in enumerate(sizes)
            }
        # Host staging per size: a short batch is padded here, then copied to the device in one piece.
        self.staging = {
            size: {spec.name: np.zeros((size, *spec.shape[1:]), DATATYPES[spec.datatype].numpy) for spec in inputs}
            for size in sizes
        }
        self.runs: collections.Counter[int] = collections.Counter()  # padded size (0: unbatched) -> runs
        self.primed: collections.Counter[int] = collections.Counter()  # the same, runs that capture nothing
        self.threads: collections.Counter[str] = collections.Counter()  # thread name -> runs, for logs and tests

    def prime(self, session: ort.InferenceSession, size: int, runs: int = GRAPH_PRIME_RUNS) -> None:
        """Regular runs of one padded size (0: unbatched) on zeros, capturing no graph (see GRAPH_PRIME_RUNS)."""
        if threading.get_ident() != self.owner:
            raise RuntimeError(
                f"CUDA graphs replay on the instance's own thread; called on {threading.current_thread().name}"
            )
        binding = self.bindings[size]
        for name, value in binding.inputs.items():
            value.update_inplace(np.zeros(value.shape(), binding.dtypes[name]))
        no_graph = ort.RunOptions()
        no_graph.add_run_config_entry(GRAPH_ID, "-1")
        for _ in range(runs):
            binding.execute(session, binding.output_names, no_graph)
            self.primed[size] += 1

    def size_for(self, rows: int) -> int:
        index = bisect.bisect_left(self.sizes, rows)
        if index == len(self.sizes):
            raise ValueError(f"a batch of {rows} rows exceeds the largest bound size {self.sizes[-1]}")
        return self.sizes[index]

    def __call__(self, session: ort.InferenceSession, output_names: list[str], feeds: dict) -> tuple[list, float]:
        if threading.get_ident() != self.owner:
            raise RuntimeError(
                f"CUDA graphs replay on the instance's own thread; called on {threading.current_thread().name}"
            )
        self.threads[threading.current_thread().name] += 1
        if not self.sizes:
            self.runs[0] += 1
            return self.bindings[0](session, output_names, feeds)
        started = time.perf_counter()
        rows = next(iter(feeds.values())).shape[0]
        size = self.size_for(rows)
        binding = self.bindings[size]
        for name, array in feeds.items():
            buffer = self.staging[size][name]
            if tuple(array.shape[1:]) != buffer.shape[1:] or array.dtype != buffer.dtype:
                raise ValueError(
                    f"input '{name}' is {array.dtype}{list(array.shape)}; bound as {buffer.dtype}{list(buffer.shape)}"
                )
            if rows == size:
                binding.inputs[name].update_inplace(np.ascontiguousarray(array))
                continue
            buffer[:rows] = array
            buffer[rows:] = 0
            binding.inputs[name].update_inplace(buffer)
        values = binding.execute(session, output_names)
        self.runs[size] += 1
        return [value[:rows] for value in values], time.perf_counter() - started
