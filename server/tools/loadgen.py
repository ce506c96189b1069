"""Load generation against a KServe v2 gRPC server: requests built from the model's metadata,
closed loops, streams and open loops (uniform or Poisson arrivals), and the numbers a run
reports. `python -m bench.loadgen` is its command line; `onnxserve-tune` drives it in-process.

Open-loop latency is measured from each request's scheduled start, not from when the
generator got round to sending it: a server (or a generator) that falls behind cannot hide
the queueing it causes (no coordinated omission).
"""

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from server import protocol
from server.processes import INFERENCE_THREADS
from server.tensors import DATATYPES
from server.tools.metrics_reader import Samples

METHOD = f"/{protocol.SERVICE_NAME}/ModelInfer"
STREAM_METHOD = f"/{protocol.SERVICE_NAME}/ModelStreamInfer"
StreamAnswer = protocol.response_class("ModelStreamInfer")
ARRIVALS = ("uniform", "poisson")


class LoadError(ValueError):
    """A request cannot be built for this model (the message says why)."""


@dataclass
class Report:
    model: str
    mode: str  # "concurrency N" or "rate R/s"
    batch: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    inferences_per_second: float = 0.0
    requests_per_second: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    server_average_batch: float | None = None
    server_cost_per_inference: float | None = None
    client_cpu_seconds: float = 0.0
    client_cpu_per_request_us: float = 0.0
    server_cpu_per_request_us: float | None = None  # with --server-pid: the server's process tree
    server_cpu_by_kind_us: dict[str, float] | None = None  # the same per request, engine and front ends apart
    server_cpu_outside_onnxruntime_us: float | None = None  # the same, less the threads that run onnxruntime
    arrivals: str | None = None  # open loop: "uniform" or "poisson"
    sent_per_second: float | None = None  # open loop: the rate requests actually left at
    send_gap_cv: float | None = None  # open loop: coefficient of variation of the gaps between sends
    error_samples: list[str] = field(default_factory=list)


def model_metadata(url: str, model: str):
    with grpc.insecure_channel(url) as channel:
        return protocol.unary(channel, "ModelMetadata")(protocol.request_class("ModelMetadata")(name=model), timeout=10)


def build_request(url: str, model: str, batch: int, dims: dict[str, list[int]]) -> bytes:
    """A ModelInferRequest with random raw contents shaped by the model's metadata; variable
    dimensions other than the batch are 1 unless `dims` gives the input's whole shape."""
    metadata = model_metadata(url, model)
    rng = np.random.default_rng(0)
    request = protocol.ModelInferRequest(model_name=model)
    for spec in metadata.inputs:
        shape = dims.get(spec.name) or [
            batch if i == 0 and d == -1 else (d if d > 0 else 1) for i, d in enumerate(spec.shape)
        ]
        values = _random(spec.datatype, shape, rng, spec.name)
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        request.raw_input_contents.append(values.tobytes())
    return request.SerializeToString()


def with_id(payload: bytes, request_id: str) -> bytes:
    """The serialized request with its `id` (field 3) set: a field appended to protobuf bytes
    overrides an earlier one, so the payload need not be parsed and serialized again."""
    text = request_id.encode()
    if len(text) > 127:
        raise ValueError("request ids here are short counters")
    return payload + b"\x1a" + bytes([len(text)]) + text


def _random(datatype: str, shape: list[int], rng, name: str) -> np.ndarray:
    dtype = DATATYPES[datatype].numpy
    if datatype == "BYTES":
        raise LoadError(f"input '{name}' is BYTES: give a model with numeric inputs")
    if name == "attention_mask":
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 1000, size=shape).astype(dtype)
    return rng.random(shape).astype(dtype)


FRONTEND_MARKS = (b"onnxserve: frontend", b"server.frontend.process")  # its title, or its command line before


def process_tree_cpu_by_kind(root: int) -> dict[str, float]:
    """CPU seconds (user + system) of a local process and all its descendants, from /proc, by kind:
    "frontend" for onnxserve's front-end processes, "engine" for the rest (the server itself, or
    the whole tree of a server without front ends); and "onnxruntime", the part of those spent in
    threads named for running onnxruntime (server/processes.py), already counted in "engine"."""
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
    totals, pending = {"engine": 0.0, "frontend": 0.0, "onnxruntime": 0.0}, [root]
    while pending:
        pid = pending.pop()
        totals[_process_kind(pid)] += seconds.get(pid, 0.0)
        totals["onnxruntime"] += _inference_seconds(pid, tick)
        pending.extend(children.get(pid, ()))
    return totals


def _inference_seconds(pid: int, tick: int) -> float:
    """CPU seconds of the process's threads named for onnxruntime: from schedstat, in nanoseconds
    (a thread's ticks in `stat` round to 10 ms each, too coarse for a few seconds' load)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        try:
            if not (task / "comm").read_text().startswith(INFERENCE_THREADS):
                continue
            if (task / "schedstat").exists():
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
            else:  # a kernel without schedstat: the ticks
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:  # the thread ended while we looked
            continue
    return total


def _process_kind(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "engine"
    return "frontend" if any(mark in command for mark in FRONTEND_MARKS) else "engine"


def process_tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of a local process and all its descendants, from /proc."""
    kinds = process_tree_cpu_by_kind(root)
    return kinds["engine"] + kinds["frontend"]


def server_figures(before: Samples | None, after: Samples | None) -> tuple[float | None, float | None]:
    """(average batch rows, cost per inference) between two readings of /metrics, over every model."""
    if before is None or after is None:
        return None, None
    batches = after.change_since(before, "onnxserve_batch_size_count")
    inferences = after.change_since(before, "onnxserve_inferences_total")
    average = after.change_since(before, "onnxserve_batch_size_sum") / batches if batches else None
    cost = after.change_since(before, "onnxserve_cost_dollars_total") / inferences if inferences else None
    return average, cost


def gap_cv(times: list[float]) -> float | None:
    """Coefficient of variation of the gaps between successive times: 1 for Poisson arrivals,
    0 for a perfectly even schedule."""
    if len(times) < 3:
        return None
    gaps = np.diff(np.array(times))
    return float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else None


class Run:
    """One run of load: its callers, what they measured, and the errors they met."""

    def __init__(
        self,
        url: str,
        payload: bytes,
        deadline: float,
        limit: int,
        progress: bool,
        in_order: bool = False,
        channel: grpc.aio.Channel | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.owns_channel = channel is None  # a caller that runs many windows keeps one connection
        self.channel = channel or grpc.aio.insecure_channel(url)
        self.call = self.channel.unary_unary(METHOD)  # bytes in, bytes out
        self.payload, self.metadata = payload, metadata or None  # gRPC metadata on every call (a tenant's)
        self.deadline, self.limit = deadline, limit
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.sent_at: list[float] = []  # open loop: when each request actually left
        self.started = 0
        self.progress = progress
        self.in_order = in_order  # stream answers come in request order, without their own ids
        self.next_progress = time.monotonic() + 5

    def more(self) -> bool:
        return time.monotonic() < self.deadline and (not self.limit or self.started < self.limit)

    async def close(self) -> None:
        if self.owns_channel:
            await self.channel.close()

    async def one(self, scheduled: float | None = None, payload: bytes | None = None) -> None:
        """One request (`payload`, or the run's); its latency runs from `scheduled` (perf_counter) when given."""
        begin = time.perf_counter() if scheduled is None else scheduled
        try:
            await self.call(payload or self.payload, timeout=60, metadata=self.metadata)
        except grpc.aio.AioRpcError as err:
            self.errors.append(f"{err.code().name}: {err.details()}")
            return
        self._answered(time.perf_counter() - begin)

    def _answered(self, latency: float) -> None:
        self.latencies.append(latency)
        if self.progress and time.monotonic() >= self.next_progress:
            self.next_progress += 5
            print(f"... {len(self.latencies)} answered, {len(self.errors)} errors", file=sys.stderr)

    async def closed_loop(self, concurrency: int, payloads: list[bytes] | None = None) -> None:
        """`concurrency` callers; with `payloads`, caller i sends payloads[i] (its own shared memory)."""

        async def caller(payload: bytes | None) -> None:
            while self.more():
                self.started += 1
                await (self.one(payload=payload) if payload else self.one())  # REST's one() has its own body

        await asyncio.gather(*(caller(payloads[i] if payloads else None) for i in range(concurrency)))

    async def streamed(self, concurrency: int, streams: int) -> None:
        windows = [concurrency // streams + (i < concurrency % streams) for i in range(streams)]
        await asyncio.gather(*(self._stream(window) for window in windows))

    async def _stream(self, window: int) -> None:
        """One stream with `window` requests in flight; answers may come in any order."""
        call = self.channel.stream_stream(STREAM_METHOD)()
        sent: dict[str, float] = {}

        async def send() -> None:
            self.started += 1
            request_id = str(self.started)
            sent[request_id] = time.perf_counter()
            await call.write(with_id(self.payload, request_id))

        try:
            while len(sent) < window and self.more():
                await send()
            while sent:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    self.errors.extend("the stream ended before this answer" for _ in sent)
                    return
                if self.in_order:  # a failure ends the stream with a status, caught below
                    self._answered(time.perf_counter() - sent.pop(next(iter(sent))))
                else:
                    answer = StreamAnswer.FromString(reply)
                    begin = sent.pop(answer.infer_response.id)
                    if answer.error_message:
                        self.errors.append(answer.error_message)
                    else:
                        self._answered(time.perf_counter() - begin)
                if self.more():
                    await send()
            await call.done_writing()
        except grpc.aio.AioRpcError as err:  # the stream broke: whatever it still carried is lost
            self.errors.extend(f"{err.code().name}: {err.details()}" for _ in sent)

    async def open_loop(self, rate: float, arrivals: str = "uniform", seed: int = 0) -> None:
        """Requests start at `rate` a second whatever the answers: evenly spaced, or with
        exponential gaps (a Poisson process, as independent users arrive), seeded."""
        if arrivals not in ARRIVALS:
            raise ValueError(f"arrivals: {arrivals!r} is not one of {ARRIVALS}")
        gaps = random.Random(seed)
        start, pending = time.perf_counter(), set()
        due = start
        while self.more():
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if not self.more():
                break
            self.started += 1
            self.sent_at.append(time.perf_counter())
            task = asyncio.create_task(self.one(scheduled=due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due = start + self.started / rate if arrivals == "uniform" else due + gaps.expovariate(rate)
        await asyncio.gather(*pending)


def fill(report: Report, run: Run, cpu_seconds: float) -> None:
    """The report's client-side figures from a finished run."""
    answered = len(run.latencies)
    report.requests, report.errors = answered + len(run.errors), len(run.errors)
    report.error_samples = sorted(set(run.errors))[:5]
    report.requests_per_second = answered / report.seconds if report.seconds else 0.0
    report.inferences_per_second = report.requests_per_second * report.batch
    if answered:
        p50, p90, p99 = np.percentile(np.array(run.latencies) * 1e3, [50, 90, 99])
        report.p50_ms, report.p90_ms, report.p99_ms = float(p50), float(p90), float(p99)
    report.client_cpu_seconds = cpu_seconds
    report.client_cpu_per_request_us = cpu_seconds / report.requests * 1e6 if report.requests else 0.0
    if len(run.sent_at) >= 2:
        report.sent_per_second = (len(run.sent_at) - 1) / (run.sent_at[-1] - run.sent_at[0])
        report.send_gap_cv = gap_cv(run.sent_at)
