"""The steps of the GPU check (bench/gpu_check.py runs them in order, each within its time limit,
and writes what each found). A step takes the check's Context and returns what it found, with a
one-line `summary`; it raises Skip where it cannot run here, and Failed where it ran and found
something wrong (what it found is kept). Raw baselines open exactly the providers and options the
server reports for the model (gpu_raw.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench import gpu_raw, make_models
from bench.grpc_client import Client
from bench.run import Running, Workload, loadgen, raw_feeds
from bench.serving import ServerProcess, start_server
from server.engine.binding import FixedBinding, bound_run
from server.engine.placement import CPU, CUDA
from server.tensors import DATATYPE_BY_ORT, TensorSpec
from server.tools import gpu_report

GRPC_ONLY = ("--http-port", "-1")  # measured over gRPC; REST would need uvicorn in the server's environment
ON_GPU = "instance_group [{ kind: KIND_GPU }]"
GRAPHS = (
    f"{ON_GPU}\nmax_batch_size: 16\noptimization {{ execution_accelerators {{ gpu_execution_accelerator "
    '[{ name: "cuda" parameters { key: "enable_cuda_graph" value: "1" } }] } }'
)
SEQUENCES = f"""{ON_GPU}
max_batch_size: 8
parameters {{ key: "io_binding" value {{ string_value: "1" }} }}
sequence_batching {{
  oldest {{ max_candidate_sequences: 64 max_queue_delay_microseconds: 2000 }}
  control_input [{{ name: "START" control [{{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }}] }}]
  state [{{ input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [1] }}]
}}"""  # the accumulator's state kept on the device between requests (bench/gpu_sequences.py)
MODELS = {  # served name -> (benchmark model, config.pbtxt, load generator shapes)
    "resnet50": ("resnet50", ON_GPU, ()),
    "encoder": ("encoder", ON_GPU, ("input_ids=1,128", "attention_mask=1,128")),
    "mlp": ("mlp", 'parameters { key: "io_binding" value { string_value: "1" } }', ()),  # --cpu: the bound path
    "graph_mlp": ("mlp", GRAPHS, ()),
    "accumulator": ("accumulator", SEQUENCES, ()),
}
GRAPH_ROWS = (1, 3, 8, 16)  # 3 rows run padded in the graph captured at 4
REPLAY_RUNS = 8  # onnxruntime captures on the second or third run: the rest replay
GROWTH_LIMIT = 64 << 20  # the arena reaches its size on the first run at a shape; more later is kept per batch


class Skip(Exception):
    """The step cannot run here; the message says why."""


class Failed(Exception):
    """The step ran and found something wrong; `found` is what it measured."""

    def __init__(self, message: str, found: dict) -> None:
        super().__init__(message)
        self.found = found


@dataclass(frozen=True)
class Plan:
    cpu: bool
    quick: bool
    seconds: float  # per measured point
    workdir: Path
    out: Path
    tune_minutes: float = 0.0

    @property
    def model(self) -> str:
        return "mlp" if self.cpu else "resnet50"

    @property
    def provider(self) -> str:
        return CPU if self.cpu else CUDA

    @property
    def concurrencies(self) -> tuple[int, ...]:
        return (1, 16) if self.quick else (1, 16, 128)

    @property
    def raw_batches(self) -> tuple[int, ...]:
        return (1, 16) if self.quick else (1, 8, 16, 32)

    def served(self) -> list[str]:
        return [self.model, "graph_mlp", "accumulator"] + ([] if self.quick else ["encoder"])


def write_models(repository: Path, names: dict[str, tuple]) -> Path:
    """repository/<name>/1/model.onnx and config.pbtxt for each (benchmark model, config, shapes)."""
    for name, (model, config, _) in names.items():
        path = repository / name / "1" / "model.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make_models.build(model).SerializeToString())
            if config:  # none: the defaults a user's model gets
                (repository / name / "config.pbtxt").write_text(config + "\n")
    return repository


class Context:
    """What steps share: one server with every served model (started by the first step that asks,
    kept for the next, stopped before TensorRT's servers), its parameters, and raw sessions."""

    def __init__(self, plan: Plan, say: Callable[[str], None]) -> None:
        self.plan, self.say = plan, say
        self.repository = plan.workdir / "served"
        self.server: ServerProcess | None = None
        self.last: ServerProcess | None = None  # the latest one started, for its log once it is gone
        self.failure = ""  # why the server cannot be had: later steps fail at once instead of retrying
        self.start_seconds: float | None = None
        self.sessions: dict[tuple, object] = {}

    def path(self, model: str) -> Path:
        write_models(self.repository, {model: MODELS[model]})  # in-process checks run without the server too
        return self.repository / model / "1" / "model.onnx"

    def serve(self) -> ServerProcess:
        if self.server is not None and self.server.process.poll() is None:
            return self.server
        if self.server is not None:
            self.failure = f"the server exited ({self.server.process.returncode}): {' | '.join(self.log_errors(4))}"
            self.server = None
        if self.failure:
            raise RuntimeError(self.failure)
        write_models(self.repository, {name: MODELS[name] for name in self.plan.served()})
        self.say(f"starting onnxserve with {', '.join(self.plan.served())} ...")
        began = time.perf_counter()
        try:
            self.server = start_server(self.repository, *GRPC_ONLY, "--strict-readiness", "false", timeout=900)
        except BaseException as err:  # failed or out of time: the check's sweep ends the process
            self.failure = f"the server did not start: {type(err).__name__}: {str(err)[-1500:]}"
            raise
        self.start_seconds, self.last = time.perf_counter() - began, self.server
        return self.server

    def parameters(self, model: str) -> dict[str, str]:
        with Client(self.serve().url) as client:
            try:
                return client.parameters(model)
            except grpc.RpcError as err:
                raise RuntimeError(f"{model}: {err.code().name}: {err.details()}; {_why(client, model)}") from None

    def providers_of(self, model: str) -> tuple[dict[str, str], list, str]:
        """The model's parameters, its provider list and where that came from. Where the server cannot
        serve the model, no parameters and a guess (CUDA device 0, or the CPU) with the reason, so
        that what runs in this process alone is still checked."""
        try:
            parameters = self.parameters(model)
        except RuntimeError as err:
            guess = [[CPU, {}]] if self.plan.cpu else [[CUDA, {"device_id": "0"}], [CPU, {}]]
            return {}, guess, f"guessed: {str(err)[:300]}"
        return (parameters, *gpu_raw.provider_list(parameters))

    def raw(self, model: str, parameters: dict[str, str], providers: list):
        key = (model, json.dumps(providers, sort_keys=True), parameters.get("intra_op_thread_count"))
        if key not in self.sessions:
            self.sessions[key] = gpu_raw.open_session(self.path(model), parameters, providers)
        return self.sessions[key]

    def running(self) -> Running:
        server = self.serve()
        return Running(server.url, server.process.pid, server.stop, f"http://127.0.0.1:{server.metrics_port}/metrics")

    def log_errors(self, count: int = 12) -> list[str]:
        """The server's last error lines: what a failed step's requests met on the other side."""
        lines = self.last.log if self.last is not None else []
        return [line for line in lines if "ERROR" in line or "Error" in line or "Traceback" in line][-count:]

    def pids(self) -> set[int]:
        return {self.server.process.pid} if self.server is not None else set()

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None and server.process.poll() is None:
            try:
                server.stop()
            except subprocess.TimeoutExpired:  # still draining (or building an engine): it must not hold the GPU
                server.process.kill()
                server.wait(10)


def _why(client: Client, model: str) -> str:
    """What the repository index says of a model that does not serve (a failed load names its error)."""
    try:
        return f"repository index: {[(m['state'], m['reason']) for m in client.index() if m['name'] == model]}"
    except grpc.RpcError as err:
        return f"no repository index either: {err.code().name}"


def environment(ctx: Context) -> dict:
    preload = list(gpu_raw.preload_cuda())
    report = gpu_report.report(None)
    missing = {name: entry["missing"] for name, entry in report["libraries"].items()}
    gpus = gpu_raw.gpu_names()
    found = {
        "python": sys.version.split()[0],
        "onnxruntime": report["onnxruntime"],
        "gpus": gpus,
        "preload": preload,
        "gpu_report": report,
    }
    libraries = "; ".join(
        f"{name}: {'loads' if not lacks else 'lacks ' + ', '.join(lacks)}" for name, lacks in missing.items()
    )
    found["summary"] = (
        f"onnxruntime {report['onnxruntime']}, providers {', '.join(report['available_providers'])}; "
        f"GPUs: {', '.join(gpus) or 'none'}; {libraries}; preload: {'; '.join(preload) or 'all loaded'}"
    )
    return found


def providers(ctx: Context) -> dict:
    server = ctx.serve()
    models = {}
    for model in ctx.plan.served():
        try:
            parameters = ctx.parameters(model)
        except RuntimeError as err:
            models[model] = {"error": str(err)}
            continue
        listed, source = gpu_raw.provider_list(parameters)
        models[model] = {
            "provider": parameters.get("execution_provider"),
            "device": parameters.get("device"),
            "io_binding": parameters.get("io_binding"),
            "provider_options": listed,
            "provider_options_from": source,
        }
    said = [line for line in server.log if "asked for" in line or "enable_cuda_graph" in line][:6]
    found = {"start_to_ready_seconds": ctx.start_seconds, "models": models, "server_log": said}
    found["summary"] = "; ".join(f"{m}: {e.get('provider') or e['error']}" for m, e in models.items())
    found["summary"] += (
        f" (options from: {', '.join(sorted({e.get('provider_options_from', '-') for e in models.values()}))})"
    )
    wrong = [model for model, entry in models.items() if entry.get("provider") != ctx.plan.provider]
    if wrong:
        raise Failed(f"not on {ctx.plan.provider}: {', '.join(wrong)}; " + found["summary"], found)
    return found


def io_binding(ctx: Context) -> dict:
    """server/engine/binding.py's bound_run equals session.run, and device memory stays flat over many runs."""
    model = ctx.plan.model
    parameters, listed, source = ctx.providers_of(model)
    session = ctx.raw(model, parameters, listed)
    provider = session.get_providers()[0]
    device = "cpu" if provider == CPU else "cuda:0"
    feeds, names = raw_feeds(session, 4, MODELS[model][2]), [output.name for output in session.get_outputs()]
    expected = session.run(names, feeds)
    bound, _ = bound_run(device, session, names, feeds)
    runs = 200 if ctx.plan.cpu else 500 if ctx.plan.quick else 1000
    before = gpu_raw.device_reading()["memory_used"]
    for _ in range(runs):
        bound_run(device, session, names, feeds)
    after = gpu_raw.device_reading()["memory_used"]
    growth = None if before is None or after is None else after - before
    found = {
        "provider": provider,
        "provider_options_from": source,
        "device": device,
        "outputs_equal_session_run": gpu_raw.close(bound, expected),
        "max_difference": gpu_raw.max_difference(bound, expected),
        "runs": runs,
        "device_memory_growth_bytes": growth,
    }
    memory = "not measured (no NVML)" if growth is None else f"{growth / 2**20:+.1f} MiB"
    found["summary"] = (
        f"{provider}: bound outputs {'equal' if found['outputs_equal_session_run'] else 'DIFFER from'} "
        f"session.run's (max |diff| {found['max_difference']:.1e}); device memory over {runs} bound runs {memory}"
    )
    if not found["outputs_equal_session_run"] or (growth or 0) > GROWTH_LIMIT:
        raise Failed(found["summary"], found)
    return found


def serving(ctx: Context, model: str = "") -> dict:
    """Raw onnxruntime in this process against onnxserve through the load generator."""
    model = model or ctx.plan.model
    shapes, parameters = MODELS[model][2], ctx.parameters(model)
    listed, source = gpu_raw.provider_list(parameters)
    session = ctx.raw(model, parameters, listed)
    ctx.say(f"{model}: raw onnxruntime at batches {ctx.plan.raw_batches} ...")
    raw = gpu_raw.time_batches(session, shapes, ctx.plan.raw_batches, ctx.plan.seconds)
    served = {}
    for concurrency in ctx.plan.concurrencies:
        ctx.say(f"{model}: onnxserve at concurrency {concurrency} ...")
        served[concurrency] = loadgen(
            ctx.running(), Workload(model, (concurrency,), (1,), shapes), concurrency, ctx.plan.seconds
        )
    found = {"model": model, "provider_options": listed, "provider_options_from": source, "raw": raw, "served": served}
    found["rows"] = rows(model, parameters.get("execution_provider", "?"), session.get_providers()[0], raw, served)
    return judged(found)


def rows(model: str, server_provider: str, raw_provider: str, raw: dict, served: dict) -> list[dict]:
    """One row per concurrency of the table: served against the best raw batch it could form."""
    found = []
    for concurrency, point in served.items():
        batch, figures = gpu_raw.reference(raw, concurrency)
        found.append(
            {
                "model": model,
                "server_provider": server_provider,
                "raw_provider": raw_provider,
                "concurrency": concurrency,
                "inferences_per_second": point["inferences_per_second"],
                "p50_ms": point["p50_ms"],
                "errors": point["errors"],
                "raw_batch": batch,
                "raw_inferences_per_second": figures["inferences_per_second"],
                "raw_ms": figures["ms"],
                "ratio": point["inferences_per_second"] / figures["inferences_per_second"],
            }
        )
    return found


def judged(found: dict, prefix: str = "") -> dict:
    """The summary against the targets (0.9 of raw batched; p50 overhead < 0.5 ms at c=1)."""
    table = found["rows"]
    first, best = table[0], max(row["ratio"] for row in table)
    overhead = first["p50_ms"] - first["raw_ms"]
    found["summary"] = prefix + (
        f"{first['model']} on {first['server_provider']} (raw: {first['raw_provider']}): best {best:.2f} of raw "
        f"(target 0.90); p50 overhead at c={first['concurrency']} {overhead:.3f} ms (target < 0.5)"
    )
    errors = sum(row["errors"] for row in table)
    if errors:
        samples = [s for point in found.get("served", {}).values() for s in point.get("error_samples", [])][:3]
        raise Failed(f"{errors} requests failed, e.g. {samples}; " + found["summary"], found)
    return found


def energy(ctx: Context) -> dict:
    """NVML's energy counter, idle and under load: the load must draw more power than idle."""
    if ctx.plan.cpu:
        raise Skip("needs NVML's energy counter on a GPU (--cpu)")
    server = ctx.serve()
    marks = [(time.perf_counter(), gpu_raw.device_reading()["energy_joules"])]
    if marks[0][1] is None:
        raise Failed("NVML gives no energy reading for cuda:0", {})
    attributed = server.samples().total("onnxserve_energy_joules_total")
    time.sleep(2.0)  # idle: no step runs anything on the GPU now
    marks.append((time.perf_counter(), gpu_raw.device_reading()["energy_joules"]))
    point = loadgen(
        ctx.running(), Workload(ctx.plan.model, (16,), (1,), MODELS[ctx.plan.model][2]), 16, ctx.plan.seconds
    )
    marks.append((time.perf_counter(), gpu_raw.device_reading()["energy_joules"]))
    idle_watts, load_watts = ((marks[i + 1][1] - marks[i][1]) / (marks[i + 1][0] - marks[i][0]) for i in (0, 1))
    inferences = point["inferences_per_second"] * ctx.plan.seconds
    found = {
        "idle_watts": idle_watts,
        "load_watts": load_watts,
        "load_joules": marks[2][1] - marks[1][1],
        "server_attributed_joules": server.samples().total("onnxserve_energy_joules_total") - attributed,
        "inferences": inferences,
        "load": point,
    }
    found["summary"] = (
        f"{idle_watts:.0f} W idle, {load_watts:.0f} W under load (c=16, loadgen start-up included); "
        f"the server attributed {found['server_attributed_joules']:.1f} J to its batches"
    )
    if not load_watts > idle_watts * 1.2:
        raise Failed("the energy counter did not move with the load: " + found["summary"], found)
    return found


def cuda_graphs(ctx: Context) -> dict:
    """A batched model served with enable_cuda_graph answers as raw session.run does, at several
    batch sizes (one padded); and in this process, a graph replayed on buffers updated in place."""
    parameters, listed, source = ctx.providers_of("graph_mlp")
    replay = replay_in_process(ctx, parameters, listed)  # first: it needs no server
    found = {"provider_options": listed, "provider_options_from": source, "in_process": replay, "served": []}
    if not parameters:
        raise Failed(f"not served ({source}); in-process {replay['summary']}", found)
    plain = ctx.raw("graph_mlp", parameters, gpu_raw.without_option(listed, "enable_cuda_graph"))
    name, names = plain.get_inputs()[0].name, [output.name for output in plain.get_outputs()]
    rng, served = np.random.default_rng(7), found["served"]
    with Client(ctx.serve().url) as client:
        for batch in GRAPH_ROWS * 2:
            x = rng.standard_normal((batch, 4), dtype=np.float32)
            answer = client.infer("graph_mlp", {name: x})
            got, want = [answer[n] for n in names], plain.run(names, {name: x})
            served.append(
                {"rows": batch, "equal": gpu_raw.close(got, want), "max_difference": gpu_raw.max_difference(got, want)}
            )
    found["summary"] = (
        f"served on {parameters.get('execution_provider')} (raw: {plain.get_providers()[0]}): rows {GRAPH_ROWS} "
        f"{'all equal' if all(s['equal'] for s in served) else 'DIFFER'}; in-process {replay['summary']}"
    )
    if not (all(s["equal"] for s in served) and replay["equal"]):
        raise Failed(found["summary"], found)
    return found


def replay_in_process(ctx: Context, parameters: dict[str, str], listed: list) -> dict:
    """The server's options with enable_cuda_graph on, inputs bound once at fixed addresses
    (binding.FixedBinding) and updated in place with fresh random values each run: every run equal
    to a plain session's proves each replay read the updated buffers."""
    graphed = [
        [n, {**o, "enable_cuda_graph": o.get("enable_cuda_graph", "True")} if n == CUDA else o] for n, o in listed
    ]
    session = gpu_raw.open_session(
        ctx.path("graph_mlp"), parameters, graphed
    )  # its own: a graph belongs to one binding
    plain = ctx.raw("graph_mlp", parameters, gpu_raw.without_option(listed, "enable_cuda_graph"))
    provider = session.get_providers()[0]

    def fixed(args) -> list[TensorSpec]:
        return [TensorSpec(a.name, DATATYPE_BY_ORT[a.type].wire, (4, *a.shape[1:])) for a in args]

    inputs, outputs = fixed(session.get_inputs()), fixed(session.get_outputs())
    binding = FixedBinding(session, "cpu" if provider == CPU else "cuda:0", inputs, outputs, graph_id=0)
    rng, names, equal, difference = np.random.default_rng(11), [spec.name for spec in outputs], True, 0.0
    for _ in range(REPLAY_RUNS):
        feeds = {spec.name: rng.standard_normal(spec.shape, dtype=np.float32) for spec in inputs}
        got, _ = binding(session, names, feeds)
        want = plain.run(names, feeds)
        equal, difference = equal and gpu_raw.close(got, want), max(difference, gpu_raw.max_difference(got, want))
    graph = provider == CUDA
    summary = (
        f"{'CUDA graph' if graph else 'no CUDA graph (' + provider + ')'}: {REPLAY_RUNS} runs on updated buffers "
        f"{'equal' if equal else 'DIFFER from'} a plain session's (max |diff| {difference:.1e})"
    )
    return {
        "provider": provider,
        "cuda_graph": graph,
        "runs": REPLAY_RUNS,
        "equal": equal,
        "max_difference": difference,
        "summary": summary,
    }


def encoder(ctx: Context) -> dict:
    return serving(ctx, "encoder")
