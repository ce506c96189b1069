"""onnxruntime sessions of one model version, opened where placement.py says (with a loud fallback): IO
specs from the graph, calibration and warm-up, and `run` in a thread per instance (or on the event loop
for batches measured to be shorter than the handoff: run_peak.py). IO binding, CUDA graphs' too, is in binding.py."""

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server import processes, protocol
from server.engine import calibration
from server.engine.binding import (
    GRAPH_CAPTURE_RUNS,
    GRAPH_OWN_SESSIONS,
    GRAPH_THREAD,
    FixedBinding,
    GraphBindings,
    GraphShapes,
    bound_run,
    cuda_graphs_asked,
    unbound,
)
from server.engine.cpus import cpu_cores
from server.engine.device_state import DeviceCopies
from server.engine.placement import GpuPolicy, Placement, open_session, plan_placements, visible_gpus
from server.engine.run_peak import RunPeak, batch_bytes
from server.errors import ConfigError, ExecutionFailed
from server.models.model_config import BatchingSettings, SessionSettings
from server.tensors import DATATYPE_BY_ORT, DATATYPES, Signature, TensorSpec, concrete_shape, zeros

log = logging.getLogger(__name__)

GRAPH_LEVELS = {
    0: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    99: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Operators whose run time depends on the data, not only the shapes: such a graph never runs inline.
DATA_DEPENDENT_OPS = frozenset({"Loop", "Scan", "If"})
# Calibration's size for variable dimensions other than the batch (a sequence, an image side):
# at 1, an encoder measures like a tiny model and gets too few threads.
CALIBRATION_DIM = 64


def session_options(settings: SessionSettings, threads: int, allow_spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = GRAPH_LEVELS[settings.graph_optimization_level]
    options.log_severity_level = 3  # onnxruntime's warnings are noise here; errors still show
    # Spinning pool threads answer sooner but hold a core between runs, which the event loop needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


def control_flow(model_path: Path) -> list[str]:
    """The data-dependent operators of the model's top-level graph. Parsing keeps every other field
    as unknown bytes for a moment: a model file's size in memory, once, at load."""
    try:
        model = protocol.OnnxModel.FromString(model_path.read_bytes())
    except Exception as err:  # noqa: BLE001 - onnxruntime loaded it; only this reading failed
        log.warning("%s: cannot read its operators (%s): assuming its run time depends on the data", model_path, err)
        return ["unknown"]
    return sorted({node.op_type for node in model.graph.node if node.op_type in DATA_DEPENDENT_OPS})


def graph_input_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """The model's inputs and their shapes (-1 for a symbolic dimension), read from the file
    before any session opens; initializers listed as inputs are left out."""
    graph = protocol.OnnxModel.FromString(model_path.read_bytes()).graph
    constants = {tensor.name for tensor in graph.initializer}
    shapes = {}
    for value in graph.input:
        if value.name in constants:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.WhichOneof("value") == "dim_value" else -1 for d in dims)
    return shapes


def graph_specs(args, model_path: Path) -> tuple[TensorSpec, ...]:
    """Inputs or outputs of a session as TensorSpecs with the graph's full shapes (-1 = symbolic)."""
    specs = []
    for arg in args:
        datatype = DATATYPE_BY_ORT.get(arg.type)
        if datatype is None:
            raise ConfigError(f"{model_path}: tensor '{arg.name}' has type {arg.type}, which onnxserve cannot serve")
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
        specs.append(TensorSpec(arg.name, datatype.wire, shape))
    return tuple(specs)


class InstancePool:
    """N sessions of one model file, each with its own worker thread."""

    # While the pool loads, loading.py sets this to its deadline's check, which raises once the load
    # is given up (its time limit, an unload, shutdown): calibration and warm-up stop between runs.
    load_check: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, model_path: Path, settings: SessionSettings, label: str, gpu: GpuPolicy = GpuPolicy()) -> None:
        self.label, self.model_path, self.settings, self.gpu = label, model_path, settings, gpu
        self.placements = plan_placements(settings, visible_gpus(), label, gpu)
        self.control_flow = control_flow(model_path)
        self.graphs = cuda_graphs_asked(settings)
        # With CUDA graphs, set by bind_batch_sizes (until then its sessions cannot run): what each
        # instance binds, and each instance's thread (threading.get_ident()).
        self.graph_shapes: GraphShapes | None = None
        self._owners: list[int] = []
        # Until calibration chooses: the configured values, else one core's share per instance.
        self.choice = calibration.previous_defaults(self.fixed(), cpu_cores(), len(self.placements))
        self._sessions = self._open_all()
        self._executors = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"ort-{label}-{i}",
                initializer=processes.name_this_thread,
                initargs=("ort-run",),
            )
            for i in range(len(self.placements))
        ]
        first = self._sessions[0]
        self.provider = self.in_use[0].providers[0][0]
        # Where each instance really runs and is billed: a GPU placement on the CPU provider is "cpu".
        self.devices = tuple(placement.device for placement in self.in_use)
        self.device = self.devices[0]
        self.inputs = graph_specs(first.get_inputs(), model_path)
        self.outputs = graph_specs(first.get_outputs(), model_path)
        self.io_binding = self._binds()
        self.static = all(dim >= 0 for spec in self.inputs + self.outputs for dim in spec.shape)
        self._kept: frozenset[str] = frozenset()  # outputs left on the device: a sequence's state
        self._runs = self._run_functions()
        self._peaks = self._run_peaks(None)

    def _binds(self) -> bool:
        """IO binding where it pays (GPU instances), where config.pbtxt asks for it, and always with
        CUDA graphs: on the CPU fallback too, so that their padded bindings serve alike everywhere."""
        strings = [spec.name for spec in self.inputs + self.outputs if spec.datatype == "BYTES"]
        asked = self.settings.io_binding
        if self.graphs and asked is False:
            raise ConfigError(
                f"{self.label}: enable_cuda_graph needs IO binding at fixed addresses; parameters['io_binding'] is 0"
            )
        if (asked or self.graphs) and strings:
            field_name = "enable_cuda_graph needs IO binding, and" if self.graphs else "parameters['io_binding']:"
            raise ConfigError(
                f"{self.label}: {field_name} onnxruntime cannot bind string tensors ({', '.join(strings)})"
            )
        if asked is None:
            return self.graphs or (self.device != "cpu" and not strings)
        return asked

    def _run_functions(self) -> list:
        """Per instance: session.run; IO binding; for a model whose shapes never change, tensors bound
        once at fixed addresses; with CUDA graphs, those per padded batch size (binding.py)."""
        if self.graphs and self.graph_shapes is None:  # until bind_batch_sizes knows the completed shapes
            return [unbound] * len(self._sessions)
        if self.graphs:
            return self.graph_shapes.bind(self.label, self._sessions, self.devices, self._owners)
        if not self.io_binding:
            return [_timed_run] * len(self._sessions)
        if self.static:
            return [
                FixedBinding(session, device, self.inputs, self.outputs)
                for session, device in zip(self._sessions, self.devices)
            ]
        return [
            functools.partial(bound_run, device, kept=self._kept, copies=DeviceCopies(device))
            for device in self.devices
        ]

    def keep_on_device(self, outputs: tuple[str, ...]) -> bool:
        """A sequence's state outputs stay on each instance's device between its requests
        (device_state.py), where the instances bind per batch; whether they do. Fixed and CUDA
        graph bindings copy every output back: there, the state lives in host memory."""
        if not outputs or self.graphs or self.static or not self.io_binding:
            return False
        self._kept = frozenset(outputs)
        self._runs = self._run_functions()
        return True

    @property
    def instance_count(self) -> int:
        return len(self._sessions)

    @property
    def intra_op_threads(self) -> int:
        return self.choice.intra_op_threads

    def fixed(self) -> calibration.Fixed:
        """What config.pbtxt fixes; the rest is measured. A GPU's CPU threads only feed it: one each."""
        settings, reasons = self.settings, {}
        threads, inline = settings.intra_op_threads, settings.inline_run_below_us
        if not threads and self.placements[0].device != "cpu":
            threads, reasons["intra_op_thread_count"] = 1, "one per GPU instance"
        if inline is None and self.control_flow:
            inline, reasons["inline_run_below_us"] = 0, f"the graph has {', '.join(self.control_flow)}"
        spinning = settings.allow_spinning
        if self.graphs:  # even where config.pbtxt says otherwise: a graph never runs on the loop
            inline, reasons["inline_run_below_us"] = 0, GRAPH_THREAD
            if not threads:
                threads, reasons["intra_op_thread_count"] = (
                    max(1, cpu_cores() // len(self.placements)),
                    GRAPH_OWN_SESSIONS,
                )
            if spinning is None:
                spinning, reasons["allow_spinning"] = threads > 1, GRAPH_OWN_SESSIONS
        return calibration.Fixed(threads or None, spinning, inline, reasons)

    def _open_all(self) -> list[ort.InferenceSession]:
        options = session_options(self.settings, self.choice.intra_op_threads, self.choice.allow_spinning)
        before = processes.thread_ids()
        opened = [
            open_session(self.model_path, options, placement, self.label, self.gpu) for placement in self.placements
        ]
        # onnxruntime's own threads (and any another load started meanwhile), for top -H and the benchmarks
        processes.name_threads(processes.thread_ids() - before, "ort-pool")
        self.in_use = [placement for _, placement in opened]  # where each instance really runs, as verified
        return [session for session, _ in opened]

    def _open(self, options: ort.SessionOptions, placement: Placement) -> ort.InferenceSession:
        return open_session(self.model_path, options, placement, self.label, self.gpu)[0]

    def calibrate(self, inputs: tuple[TensorSpec, ...], max_batch_size: int) -> calibration.Choice:
        """Measure what config.pbtxt leaves open (blocking, about 2 s at most), then reopen the
        sessions with the choice. A model that cannot run on zeros keeps the previous defaults."""
        fixed, cores = self.fixed(), cpu_cores()
        before = (self.choice.intra_op_threads, self.choice.allow_spinning)
        loop = asyncio.new_event_loop()  # a private one: this runs in a worker thread, off the server's loop
        try:
            choice = calibration.calibrate(
                self._trial_runner(inputs),
                lambda: self._handoff(loop),
                fixed,
                cores,
                self.instance_count,
                max_batch_size,
            )
        except Exception as err:  # noqa: BLE001 - any failure of a trial run means: keep the defaults
            self.load_check()  # ... unless the load was given up: then calibration stops here
            choice = calibration.fallback(fixed, cores, self.instance_count, f"{err}")
            log.warning("%s: %s", self.label, choice.note)
        finally:
            loop.close()
        self.choice = choice
        if not _same_options(before, (choice.intra_op_threads, choice.allow_spinning)):
            self._sessions = self._open_all()
            self._runs = self._run_functions()
        self._peaks = self._run_peaks(choice.run_seconds, calibrated_bytes(inputs, choice))
        return choice

    def _trial_runner(self, inputs: tuple[TensorSpec, ...]) -> calibration.OpenRun:
        def open_run(threads: int, spinning: bool) -> calibration.Run:
            if _same_options((self.choice.intra_op_threads, self.choice.allow_spinning), (threads, spinning)):
                session = self._sessions[0]
            elif self.graphs:  # fixed() leaves nothing to measure on other sessions; this guards it
                raise RuntimeError(GRAPH_OWN_SESSIONS)
            else:
                session = self._open(session_options(self.settings, threads, spinning), self.placements[0])
            feeds: dict[int, dict] = {}

            def run(batch: int) -> None:
                self.load_check()
                if batch not in feeds:
                    feeds[batch] = {spec.name: zeros(spec, batch, CALIBRATION_DIM) for spec in inputs}
                if self.graphs:
                    self._on_thread(0, self._runs[0], session, [spec.name for spec in self.outputs], feeds[batch])
                else:
                    session.run(None, feeds[batch])

            return run

        return open_run

    def _handoff(self, loop: asyncio.AbstractEventLoop) -> None:
        """One round trip from an event loop to an instance's thread and back, as a batch makes it."""
        loop.run_until_complete(loop.run_in_executor(self._executors[0], int))

    def _run_peaks(self, calibrated_seconds: float | None, calibrated_size: int = 0) -> list[RunPeak | None]:
        below = self.choice.inline_run_below_us / 1e6
        if not below:
            return [None] * len(self.placements)
        return [RunPeak.starting(below, calibrated_seconds, calibrated_size) for _ in self.placements]

    def run_everywhere(self, feeds: dict[str, np.ndarray], count: int = 1) -> None:
        """Run `feeds` `count` times on every instance (warm-up); blocking; ExecutionFailed on failure.
        With CUDA graphs, on each instance's own thread through its bindings, as batches run."""
        names = [spec.name for spec in self.outputs]
        for instance, session in enumerate(self._sessions):
            for _ in range(count):
                self.load_check()
                try:
                    if self.graphs:
                        self._on_thread(instance, self._runs[instance], session, names, feeds)
                    else:
                        session.run(None, feeds)
                except Exception as err:
                    raise ExecutionFailed(f"{self.label}: onnxruntime failed: {err}") from err

    def bind_batch_sizes(self, batching: BatchingSettings, signature: Signature) -> None:
        """With CUDA graphs (else nothing): each instance's fixed bindings per padded batch size, at the
        completed config's shapes (binding.GraphShapes). Blocking: it allocates device buffers."""
        if not self.graphs:
            return
        self.graph_shapes = GraphShapes.of(self.label, batching, signature)
        self._owners = [self._on_thread(instance, threading.get_ident) for instance in range(self.instance_count)]
        self._runs = self._run_functions()

    def capture_graphs(self, runs: int = GRAPH_CAPTURE_RUNS) -> tuple[int, ...]:
        """Blocking: each padded size `runs` times on every instance's thread through its binding and
        graph id, so every CUDA graph is captured before the model is ready; the sizes (() = unbatched)."""
        for size in self.graph_shapes.sizes or (0,):
            for instance, (session, bindings) in enumerate(zip(self._sessions, self._runs)):
                try:
                    self._on_thread(instance, bindings.prime, session, size)
                except Exception as err:
                    raise ExecutionFailed(f"{self.label}: onnxruntime failed: {err}") from err
            self.run_everywhere(self.graph_shapes.zeros(size), runs)
        return self.graph_shapes.sizes

    @property
    def graph_bindings(self) -> list[GraphBindings]:
        """Each instance's bindings, with CUDA graphs on and batch sizes bound; else empty."""
        return [run for run in self._runs if isinstance(run, GraphBindings)]

    def _on_thread(self, instance: int, function, *args):
        """`function(*args)` on the instance's own thread, waited for: load code in a worker thread only."""
        return self._executors[instance].submit(function, *args).result()

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str], instance: int):
        """The outputs, when the batch runs on the loop; else an awaitable of them (the instance's thread)."""
        session, peak = self._sessions[instance], self._peaks[instance]
        size = None if peak is None else batch_bytes(feeds)
        if peak is None or not peak.runs_inline(size):
            return self._run_in_thread(feeds, output_names, instance, size)
        try:
            values, seconds = self._runs[instance](session, output_names, feeds)
        except Exception as err:
            raise ExecutionFailed(f"{self.label}: onnxruntime failed: {err}") from err
        peak.observe(seconds, size, self.label, instance)
        return dict(zip(output_names, values))

    async def _run_in_thread(
        self, feeds: dict, output_names: list[str], instance: int, size: int | None
    ) -> dict[str, np.ndarray]:
        session, executor = self._sessions[instance], self._executors[instance]
        try:
            values, seconds = await asyncio.get_running_loop().run_in_executor(
                executor, self._runs[instance], session, output_names, feeds
            )
        except Exception as err:
            raise ExecutionFailed(f"{self.label}: onnxruntime failed: {err}") from err
        if (peak := self._peaks[instance]) is not None:
            peak.observe(seconds, size, self.label, instance)
        return dict(zip(output_names, values))

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._runs = []  # bound device buffers go before their sessions
        self._sessions.clear()


def _same_options(a: tuple[int, bool], b: tuple[int, bool]) -> bool:
    """Whether sessions opened with (threads, spinning) a and b run alike: one thread has no pool to spin."""
    return a[0] == b[0] and (a[0] == 1 or a[1] == b[1])


def _timed_run(session: ort.InferenceSession, output_names: list[str], feeds: dict) -> tuple[list, float]:
    started = time.perf_counter()
    values = session.run(output_names, feeds)
    return values, time.perf_counter() - started


def calibrated_bytes(inputs: tuple[TensorSpec, ...], choice: calibration.Choice) -> int:
    """The input bytes (strings count none) of the batch whose run calibration timed: batches no
    bigger may run on the loop before any is measured (RunPeak)."""
    batch = next((b for _, _, b, seconds in reversed(choice.timings) if seconds == choice.run_seconds), 1)
    return sum(
        math.prod(concrete_shape(spec, batch, CALIBRATION_DIM)) * np.dtype(DATATYPES[spec.datatype].numpy).itemsize
        for spec in inputs
        if spec.datatype != "BYTES"
    )
