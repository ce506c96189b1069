"""Load generator for any KServe v2 server, over gRPC or REST.

    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --concurrency 64 --duration 10
    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --rate 2000 --requests 20000 --json
    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --concurrency 64 --streams 4
    python -m bench.loadgen --url 127.0.0.1:8001 --http-url 127.0.0.1:8000 --http-body binary --model mlp

Closed loop (`--concurrency N`: N callers, each sends its next request when the last is
answered) or open loop (`--rate R`: requests start R times a second whatever the answers).
With `--streams S` the N requests in flight travel over S ModelStreamInfer streams (Triton's
streaming RPC) instead of one ModelInfer call each. MLServer's ModelStreamInfer answers with
bare ModelInferResponse messages, in order, all carrying the stream's first id: say
`--stream-protocol mlserver` for it. With `--http-url` each request is a REST POST to
/v2/models/<model>/infer instead (`--http-body binary`: Triton's binary tensor data extension,
`json`: tensors as JSON lists); the model's metadata still comes over gRPC from `--url`.
Prints throughput, p50/p90/p99 latency and errors; with `--metrics-url` (an onnxserve
/metrics), also the average batch size and the cost per inference the server measured.

The request is serialized once and sent as bytes, so the generator spends its CPU on gRPC,
not on protobuf: on a small machine it competes with the server, and it reports how much
CPU it used so that the figures can be read with that in mind.
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from server import protocol
from server.tensors import DATATYPES

METHOD = f"/{protocol.SERVICE_NAME}/ModelInfer"
STREAM_METHOD = f"/{protocol.SERVICE_NAME}/ModelStreamInfer"
StreamAnswer = protocol.response_class("ModelStreamInfer")


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
    error_samples: list[str] = field(default_factory=list)


def build_request(url: str, model: str, batch: int, dims: dict[str, list[int]]) -> bytes:
    """A ModelInferRequest with random raw contents shaped by the model's metadata."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            f"/{protocol.SERVICE_NAME}/ModelMetadata",
            request_serializer=protocol.request_class("ModelMetadata").SerializeToString,
            response_deserializer=protocol.ModelMetadataResponse.FromString,
        )
        metadata = call(protocol.request_class("ModelMetadata")(name=model), timeout=10)
    rng = np.random.default_rng(0)
    request = protocol.ModelInferRequest(model_name=model)
    for spec in metadata.inputs:
        shape = dims.get(spec.name) or [batch if i == 0 and d == -1 else (d if d > 0 else 1) for i, d in enumerate(spec.shape)]
        values = _random(spec.datatype, shape, rng, spec.name)
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        request.raw_input_contents.append(values.tobytes())
    return request.SerializeToString()


def http_body(payload: bytes, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The same request as a REST body: the JSON header and, for binary, the raw tensors after it."""
    request = protocol.ModelInferRequest.FromString(payload)
    inputs, raw = [], []
    for tensor, content in zip(request.inputs, request.raw_input_contents):
        described = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        if binary:
            described["parameters"] = {"binary_data_size": len(content)}
            raw.append(content)
        else:
            described["data"] = np.frombuffer(content, dtype=DATATYPES[tensor.datatype].numpy).tolist()
        inputs.append(described)
    header = {"inputs": inputs}
    if binary:
        header["parameters"] = {"binary_data_output": True}
    text = json.dumps(header).encode()
    if not binary:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(raw), {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(text))}


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
        raise SystemExit(f"input '{name}' is BYTES: give a model with numeric inputs")
    if name == "attention_mask":
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 1000, size=shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def process_tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of a local process and all its descendants, from /proc."""
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
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        total += seconds.get(pid, 0.0)
        pending.extend(children.get(pid, ()))
    return total


def scrape(metrics_url: str | None) -> dict | None:
    if not metrics_url:
        return None
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def server_figures(before: dict | None, after: dict | None) -> tuple[float | None, float | None]:
    if before is None or after is None:
        return None, None

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches, inferences = delta("onnxserve_batch_size_count"), delta("onnxserve_inferences_total")
    average = delta("onnxserve_batch_size_sum") / batches if batches else None
    cost = delta("onnxserve_cost_dollars_total") / inferences if inferences else None
    return average, cost


class Run:
    def __init__(self, url: str, payload: bytes, deadline: float, limit: int, progress: bool, in_order: bool = False) -> None:
        self.channel = grpc.aio.insecure_channel(url)
        self.call = self.channel.unary_unary(METHOD)  # bytes in, bytes out
        self.payload = payload
        self.deadline, self.limit = deadline, limit
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.started = 0
        self.progress = progress
        self.in_order = in_order  # stream answers come in request order, without their own ids
        self.next_progress = time.monotonic() + 5

    def more(self) -> bool:
        return time.monotonic() < self.deadline and (not self.limit or self.started < self.limit)

    async def close(self) -> None:
        await self.channel.close()

    async def one(self) -> None:
        begin = time.perf_counter()
        try:
            await self.call(self.payload, timeout=60)
        except grpc.aio.AioRpcError as err:
            self.errors.append(f"{err.code().name}: {err.details()}")
            return
        self._answered(time.perf_counter() - begin)

    def _answered(self, latency: float) -> None:
        self.latencies.append(latency)
        if self.progress and time.monotonic() >= self.next_progress:
            self.next_progress += 5
            print(f"... {len(self.latencies)} answered, {len(self.errors)} errors", file=sys.stderr)

    async def closed_loop(self, concurrency: int) -> None:
        async def caller() -> None:
            while self.more():
                self.started += 1
                await self.one()

        await asyncio.gather(*(caller() for _ in range(concurrency)))

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

    async def open_loop(self, rate: float) -> None:
        start, pending = time.perf_counter(), set()
        while self.more():
            due = start + self.started / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            self.started += 1
            task = asyncio.create_task(self.one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)


class HttpRun(Run):
    """The same loops, each request a REST POST on one keep-alive connection per caller."""

    def __init__(self, url: str, http_url: str, model: str, body: tuple[bytes, dict], **kwargs) -> None:
        import aiohttp  # only REST runs need it

        super().__init__(url, b"", **kwargs)
        self.aiohttp = aiohttp
        self.endpoint = f"http://{http_url}/v2/models/{model}/infer"
        self.body, self.headers = body
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def one(self) -> None:
        begin = time.perf_counter()
        try:
            async with self.session.post(self.endpoint, data=self.body, headers=self.headers) as response:
                answer = await response.read()
                if response.status != 200:
                    self.errors.append(f"HTTP {response.status}: {answer[:200].decode(errors='replace')}")
                    return
        except self.aiohttp.ClientError as err:
            self.errors.append(f"{type(err).__name__}: {err}")
            return
        self._answered(time.perf_counter() - begin)

    async def close(self) -> None:
        await self.session.close()
        await super().close()


def new_run(args, payload: bytes, deadline: float, limit: int, progress: bool) -> Run:
    if args.http_url:
        body = http_body(payload, args.http_body == "binary")
        return HttpRun(args.url, args.http_url, args.model, body, deadline=deadline, limit=limit, progress=progress)
    return Run(args.url, payload, deadline, limit, progress, in_order=args.stream_protocol == "mlserver")


async def run_load(args) -> Report:
    dims = {name: [int(d) for d in text.split(",")] for name, text in (item.split("=") for item in args.shape)}
    payload = build_request(args.url, args.model, args.batch, dims)
    mode = f"rate {args.rate:g}/s" if args.rate else f"concurrency {args.concurrency}"
    if args.streams:
        mode += f" over {args.streams} streams"
    if args.http_url:
        mode += f" over REST ({args.http_body})"
    report = Report(model=args.model, mode=mode, batch=args.batch)
    if args.warmup:
        warm = new_run(args, payload, time.monotonic() + args.warmup, 0, False)
        await warm.closed_loop(min(args.concurrency, 8) if not args.rate else 4)
        await warm.close()
    before = scrape(args.metrics_url)
    server_before = process_tree_cpu(args.server_pid) if args.server_pid else None
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    limit = args.requests or 0
    deadline = time.monotonic() + (args.duration if not limit else 1e9)
    run = new_run(args, payload, deadline, limit, args.progress)
    began = time.perf_counter()
    if args.streams:
        await run.streamed(args.concurrency, args.streams)
    else:
        await (run.open_loop(args.rate) if args.rate else run.closed_loop(args.concurrency))
    report.seconds = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    server_after = process_tree_cpu(args.server_pid) if args.server_pid else None
    await run.close()
    after = scrape(args.metrics_url)
    _fill(report, run, cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime)
    report.server_average_batch, report.server_cost_per_inference = server_figures(before, after)
    if server_before is not None and report.requests:
        report.server_cpu_per_request_us = (server_after - server_before) / report.requests * 1e6
    return report


def _fill(report: Report, run: Run, cpu_seconds: float) -> None:
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


def print_report(report: Report) -> None:
    print(f"{report.model} ({report.mode}, batch {report.batch}): {report.requests} requests in {report.seconds:.1f} s")
    print(f"  throughput  {report.inferences_per_second:,.0f} inferences/s ({report.requests_per_second:,.0f} requests/s)")
    print(f"  latency     p50 {report.p50_ms:.3f} ms   p90 {report.p90_ms:.3f} ms   p99 {report.p99_ms:.3f} ms")
    print(f"  errors      {report.errors}" + (f"  e.g. {report.error_samples[0]}" if report.error_samples else ""))
    if report.server_average_batch is not None:
        print(f"  server      average batch {report.server_average_batch:.2f} rows")
    if report.server_cost_per_inference is not None:
        print(f"  cost        ${report.server_cost_per_inference:.3e} per inference")
    if report.server_cpu_per_request_us is not None:
        print(f"  server CPU  {report.server_cpu_per_request_us:.0f} us per request")
    load = report.client_cpu_seconds / report.seconds if report.seconds else 0.0
    print(f"  client CPU  {report.client_cpu_seconds:.2f} s ({load:.0%} of a core, {report.client_cpu_per_request_us:.0f} us per request)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--model", required=True)
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=1, help="closed loop: callers in flight")
    loop.add_argument("--rate", type=float, default=0.0, help="open loop: requests started per second")
    parser.add_argument("--streams", type=int, default=0, help="closed loop over this many ModelStreamInfer streams")
    parser.add_argument("--stream-protocol", choices=("triton", "mlserver"), default="triton",
                        help="what the server's ModelStreamInfer answers with (see above)")  # fmt: skip
    parser.add_argument("--http-url", default=None, help="REST host:port: send each request as a REST POST")
    parser.add_argument("--http-body", choices=("binary", "json"), default="binary",
                        help="with --http-url: Triton's binary tensor extension, or tensors as JSON lists")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (unless --requests)")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many requests")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--shape", action="append", default=[], help="NAME=D0,D1,... for an input (e.g. input_ids=1,128)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--metrics-url", default=None, help="onnxserve /metrics, for batch size and cost")
    parser.add_argument("--server-pid", type=int, default=0,
                        help="a server on this machine: report its process tree's CPU per request")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--progress", action="store_true", help="a line every 5 s on stderr")
    args = parser.parse_args(argv)
    if args.streams and (args.rate or not 1 <= args.streams <= args.concurrency):
        parser.error("--streams needs --concurrency at least as large, and no --rate")
    if args.streams and args.http_url:
        parser.error("--streams is gRPC's ModelStreamInfer: not with --http-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(run_load(args))
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print_report(report)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
