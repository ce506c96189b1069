"""Load generator for any KServe v2 server, over gRPC or REST.

    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --concurrency 64 --duration 10
    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --rate 2000 --requests 20000 --json
    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --rate 300 --arrivals poisson --duration 10
    python -m bench.loadgen --url 127.0.0.1:8001 --model mlp --concurrency 64 --streams 4
    python -m bench.loadgen --url 127.0.0.1:8001 --http-url 127.0.0.1:8000 --http-body binary --model mlp

Closed loop (`--concurrency N`: N callers, each sends its next request when the last is
answered) or open loop (`--rate R`: requests start R times a second whatever the answers,
evenly spaced or, with `--arrivals poisson`, with exponential gaps; latency counts from each
request's scheduled start, so a server that falls behind shows its queueing).
With `--streams S` the N requests in flight travel over S ModelStreamInfer streams (Triton's
streaming RPC) instead of one ModelInfer call each. MLServer's ModelStreamInfer answers with
bare ModelInferResponse messages, in order, all carrying the stream's first id: say
`--stream-protocol mlserver` for it. With `--shared-memory` each of the N callers has a system shared memory region of its own,
registered with the server (Triton's extension), holding its inputs and receiving its outputs: the
requests and answers carry no tensor bytes. With `--http-url` each request is a REST POST to
/v2/models/<model>/infer instead (`--http-body binary`: Triton's binary tensor data extension,
`json`: tensors as JSON lists); the model's metadata still comes over gRPC from `--url`.
Prints throughput, p50/p90/p99 latency and errors; with `--metrics-url` (an onnxserve
/metrics), also the average batch size and the cost per inference the server measured.

The request is serialized once and sent as bytes, so the generator spends its CPU on gRPC,
not on protobuf: on a small machine it competes with the server, and it reports how much
CPU it used so that the figures can be read with that in mind. The core (requests, loops,
the report) is server/tools/loadgen.py, which onnxserve-tune uses; this file adds REST and the CLI.
"""

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict

import numpy as np

from bench.shm_regions import CallerRegions
from server import protocol
from server.tensors import DATATYPES
from server.tools.loadgen import (  # the core lives in the package, so onnxserve-tune has it installed
    ARRIVALS,
    LoadError,
    Report,
    Run,
    build_request,
    fill,
    process_tree_cpu_by_kind,
    server_figures,
)
from server.tools.metrics_reader import read_samples


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
    return text + b"".join(raw), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(text)),
    }


class HttpRun(Run):
    """The same loops, each request a REST POST on one keep-alive connection per caller."""

    def __init__(self, url: str, http_url: str, model: str, body: tuple[bytes, dict], **kwargs) -> None:
        import aiohttp  # only REST runs need it

        super().__init__(url, b"", **kwargs)
        self.aiohttp = aiohttp
        self.endpoint = f"http://{http_url}/v2/models/{model}/infer"
        self.body, self.headers = body
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def one(self, scheduled: float | None = None) -> None:
        begin = time.perf_counter() if scheduled is None else scheduled
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
    metadata = tuple(tuple(header.split("=", 1)) for header in args.header)
    return Run(
        args.url, payload, deadline, limit, progress, in_order=args.stream_protocol == "mlserver", metadata=metadata
    )


async def run_load(args) -> Report:
    dims = {name: [int(d) for d in text.split(",")] for name, text in (item.split("=") for item in args.shape)}
    payload = build_request(args.url, args.model, args.batch, dims)
    mode = f"concurrency {args.concurrency}"
    if args.rate:
        mode = f"rate {args.rate:g}/s" + (", poisson arrivals" if args.arrivals == "poisson" else "")
    if args.streams:
        mode += f" over {args.streams} streams"
    if args.http_url:
        mode += f" over REST ({args.http_body})"
    if args.shared_memory:
        mode += " in system shared memory"
    report = Report(model=args.model, mode=mode, batch=args.batch, arrivals=args.arrivals if args.rate else None)
    if args.warmup:
        warm = new_run(args, payload, time.monotonic() + args.warmup, 0, False)
        await warm.closed_loop(min(args.concurrency, 8) if not args.rate else 4)
        await warm.close()
    before = read_samples(args.metrics_url) if args.metrics_url else None
    server_before = process_tree_cpu_by_kind(args.server_pid) if args.server_pid else None
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    limit = args.requests or 0
    deadline = time.monotonic() + (args.duration if not limit else 1e9)
    run = new_run(args, payload, deadline, limit, args.progress)
    regions = CallerRegions(args.url, args.model, payload, args.concurrency) if args.shared_memory else None
    began = time.perf_counter()
    if args.streams:
        await run.streamed(args.concurrency, args.streams)
    elif regions is not None:
        await run.closed_loop(args.concurrency, regions.payloads)
    else:
        await (run.open_loop(args.rate, args.arrivals, args.seed) if args.rate else run.closed_loop(args.concurrency))
    report.seconds = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    server_after = process_tree_cpu_by_kind(args.server_pid) if args.server_pid else None
    await run.close()
    if regions is not None:
        regions.close()
    after = read_samples(args.metrics_url) if args.metrics_url else None
    fill(report, run, cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime)
    report.server_average_batch, report.server_cost_per_inference = server_figures(before, after)
    if server_before is not None and report.requests:
        per_kind = {kind: (server_after[kind] - server_before[kind]) / report.requests * 1e6 for kind in server_after}
        report.server_cpu_per_request_us = per_kind["engine"] + per_kind["frontend"]
        report.server_cpu_outside_onnxruntime_us = report.server_cpu_per_request_us - per_kind["onnxruntime"]
        report.server_cpu_by_kind_us = per_kind
    return report


def print_report(report: Report) -> None:
    print(f"{report.model} ({report.mode}, batch {report.batch}): {report.requests} requests in {report.seconds:.1f} s")
    print(
        f"  throughput  {report.inferences_per_second:,.0f} inferences/s ({report.requests_per_second:,.0f} requests/s)"
    )
    print(f"  latency     p50 {report.p50_ms:.3f} ms   p90 {report.p90_ms:.3f} ms   p99 {report.p99_ms:.3f} ms")
    print(f"  errors      {report.errors}" + (f"  e.g. {report.error_samples[0]}" if report.error_samples else ""))
    if report.server_average_batch is not None:
        print(f"  server      average batch {report.server_average_batch:.2f} rows")
    if report.server_cost_per_inference is not None:
        print(f"  cost        ${report.server_cost_per_inference:.3e} per inference")
    if report.server_cpu_per_request_us is not None:
        outside = report.server_cpu_outside_onnxruntime_us
        print(
            f"  server CPU  {report.server_cpu_per_request_us:.0f} us per request ({outside:.0f} outside onnxruntime)"
        )
        if report.server_cpu_by_kind_us and report.server_cpu_by_kind_us["frontend"]:
            engine, frontends = report.server_cpu_by_kind_us["engine"], report.server_cpu_by_kind_us["frontend"]
            print(f"              engine {engine:.0f} us, front ends {frontends:.0f} us ({engine / frontends:.2f})")
    if report.send_gap_cv is not None:
        print(
            f"  arrivals    {report.arrivals}: sent {report.sent_per_second:,.1f}/s, "
            f"gaps' coefficient of variation {report.send_gap_cv:.2f}"
        )
    load = report.client_cpu_seconds / report.seconds if report.seconds else 0.0
    print(
        f"  client CPU  {report.client_cpu_seconds:.2f} s ({load:.0%} of a core, {report.client_cpu_per_request_us:.0f} us per request)"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--model", required=True)
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=1, help="closed loop: callers in flight")
    loop.add_argument("--rate", type=float, default=0.0, help="open loop: requests started per second")
    parser.add_argument(
        "--arrivals",
        choices=ARRIVALS,
        default="uniform",
        help="open loop: evenly spaced, or Poisson (exponential gaps, as independent users arrive)",
    )
    parser.add_argument("--seed", type=int, default=0, help="open loop with Poisson arrivals: the gaps' random seed")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gRPC metadata on every unary call, repeatable (x-tenant-id=team-a with --trust-tenant-header)",
    )
    parser.add_argument("--streams", type=int, default=0, help="closed loop over this many ModelStreamInfer streams")
    parser.add_argument(
        "--stream-protocol",
        choices=("triton", "mlserver"),
        default="triton",
        help="what the server's ModelStreamInfer answers with (see above)",
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="closed loop, gRPC unary: each caller's tensors in a system shared memory region of its own",
    )
    parser.add_argument("--http-url", default=None, help="REST host:port: send each request as a REST POST")
    parser.add_argument(
        "--http-body",
        choices=("binary", "json"),
        default="binary",
        help="with --http-url: Triton's binary tensor extension, or tensors as JSON lists",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (unless --requests)")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many requests")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument(
        "--shape", action="append", default=[], help="NAME=D0,D1,... for an input (e.g. input_ids=1,128)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--metrics-url", default=None, help="onnxserve /metrics, for batch size and cost")
    parser.add_argument(
        "--server-pid", type=int, default=0, help="a server on this machine: report its process tree's CPU per request"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--progress", action="store_true", help="a line every 5 s on stderr")
    args = parser.parse_args(argv)
    if args.streams and (args.rate or not 1 <= args.streams <= args.concurrency):
        parser.error("--streams needs --concurrency at least as large, and no --rate")
    if args.streams and args.http_url:
        parser.error("--streams is gRPC's ModelStreamInfer: not with --http-url")
    if args.shared_memory and (args.rate or args.streams or args.http_url):
        parser.error(
            "--shared-memory is a closed loop of gRPC ModelInfer calls: not with --rate, --streams or --http-url"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = asyncio.run(run_load(args))
    except LoadError as err:
        print(f"bench.loadgen: --model {args.model}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print_report(report)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
