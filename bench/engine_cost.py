"""What a request costs the engine, apart from any transport: the part of a server's CPU per
request that stays in the engine's process when front ends run in processes of their own.

    python -m bench.engine_cost [--concurrency 64] [--duration 5]

Two measurements in one run, of the benchmark MLP on default settings:
- the engine alone: built as the server builds it (server/app.py build_engine), driven in this
  process by `concurrency` coroutines with requests already decoded (resolve, queue, batch, run,
  accounting, end, with every observer subscribed): CPU per request of this process;
- the engine over the link: `python -m server --frontends 2`, its engine driven by this process as
  one more front end would drive it (server/frontend/link_client.py, requests already decoded) at
  `--link-concurrency` requests in flight, enough to keep it busy: CPU per request of the engine's
  process alone. This is what it costs when front ends on many cores keep it full; on a small
  machine the front ends cannot, so its batches stay small and each request costs it more;
- the whole server: `python -m server` under the load generator at the same concurrency (unary
  gRPC): CPU per request of its process tree.
The difference is what decoding, encoding and the transports cost: the front end's share. One
engine keeps up with as many front ends as their CPU per request exceeds its own.
"""

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import make_models
from bench.run import WORKLOADS, loadgen, start_onnxserve
from bench.serving import start_server
from server.app import build_engine
from server.config import parse_server_settings
from server.engine.call import GRPC, Identity
from server.frontend.identity import Authenticator
from server.frontend.link_client import Link, RemoteCore, RemoteInfo
from server.observe.frontend_metrics import read_process
from server.tensors import DATATYPES, DecodedRequest

ANONYMOUS = Identity("unknown", "unknown", "none")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def decoded_request(signature) -> DecodedRequest:
    feeds = {spec.name: np.ones([1, *spec.shape[1:]], DATATYPES[spec.datatype].numpy) for spec in signature.inputs}
    return DecodedRequest(feeds, 1, signature.output_names)


async def engine_alone(repository: Path, concurrency: int, seconds: float) -> dict:
    settings = parse_server_settings(["--model-repository", str(repository)])
    auth = Authenticator(None, False, False, settings.max_tenant_series)
    engine = build_engine(settings, auth)
    await engine.repository.load_all(["mlp"])
    core, signature = engine.core, engine.repository.get("mlp").signature
    decoded = decoded_request(signature)
    done, count = time.monotonic() + seconds, 0

    async def caller() -> None:
        nonlocal count
        while time.monotonic() < done:
            with core.request(GRPC, auth.anonymous) as call:
                await core.resolve(call, "mlp", "")
                answer = await core.infer(call, decoded, {})
                core.accounting(call, answer)
            count += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))  # warm: pools, caches, histograms
    done, count = time.monotonic() + seconds, 0
    cpu, wall = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    await engine.repository.close(5.0)
    engine.energy.close()
    return {"requests_per_second": count / wall, "cpu_per_request_us": cpu / count * 1e6}


def link_path(engine_pid: int) -> str:
    """The engine's link socket: the Unix socket it listens on (from /proc/net/unix and its fds)."""
    inodes = set()
    for fd in Path(f"/proc/{engine_pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[6] in inodes and fields[7].endswith("engine.sock"):
            return fields[7]
    raise RuntimeError("the server has no link socket")


async def drive_link(path: str, concurrency: int, seconds: float, engine_pid: int) -> dict:
    connection = await Link.connect(path)
    core = RemoteCore(connection, 0)
    model = await RemoteInfo(connection).model("mlp", "")
    decoded = decoded_request(model.signature)
    count, done = 0, 0.0

    async def caller() -> None:
        nonlocal count
        while time.monotonic() < done:
            with core.request(GRPC, ANONYMOUS) as call:
                await core.resolve(call, "mlp", "")
                await core.infer(call, decoded, {})
            count += 1

    for _ in range(2):  # warm, then measure
        done, count = time.monotonic() + seconds, 0
        cpu, wall = read_process(engine_pid)[0], time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        cpu, wall = read_process(engine_pid)[0] - cpu, time.perf_counter() - wall
    connection.close()
    return {"requests_per_second": count / wall, "cpu_per_request_us": cpu / count * 1e6}


def engine_over_link(repository: Path, concurrency: int, seconds: float) -> dict:
    server = start_server(repository, "--frontends", "2")  # 1 is one process, without the link
    try:
        result = asyncio.run(drive_link(link_path(server.process.pid), concurrency, seconds, server.process.pid))
        batches = server.samples()
        result["average_batch"] = batches.get("onnxserve_batch_size_sum") / batches.get("onnxserve_batch_size_count")
        return result
    finally:
        server.stop()


def whole_server(repository: Path, concurrency: int, seconds: float) -> dict:
    model_path = repository / "mlp" / "1" / "model.onnx"
    running = start_onnxserve(repository, model_path, repository)
    try:
        loadgen(running, WORKLOADS["mlp"], concurrency, seconds)  # warm
        report = loadgen(running, WORKLOADS["mlp"], concurrency, seconds)
    finally:
        running.stop()
    return {
        "requests_per_second": report["inferences_per_second"],
        "cpu_per_request_us": report["server_cpu_per_request_us"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--link-concurrency", type=int, default=512, help="requests in flight over the link")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxserve-engine-cost-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, ["mlp"])
        engine = asyncio.run(engine_alone(repository, args.concurrency, args.duration))
        linked = engine_over_link(repository, args.link_concurrency, args.duration)
        server = whole_server(repository, args.concurrency, args.duration)
    front = server["cpu_per_request_us"] - engine["cpu_per_request_us"]
    print(f"MLP, concurrency {args.concurrency}, default settings")
    print(
        f"  engine alone   {engine['requests_per_second']:9,.0f} req/s  {engine['cpu_per_request_us']:6.0f} us CPU/req"
    )
    print(
        f"  whole server   {server['requests_per_second']:9,.0f} req/s  {server['cpu_per_request_us']:6.0f} us CPU/req"
    )
    print(
        f"  engine over the link {linked['requests_per_second']:9,.0f} req/s  {linked['cpu_per_request_us']:6.0f} us CPU/req"
        f"  (batches of {linked['average_batch']:.1f} rows, {args.link_concurrency} in flight)"
    )
    print(f"  front end's share {front:.0f} us/req; engine / front end = {engine['cpu_per_request_us'] / front:.2f}")
    print(f"  with the link: engine / front end = {linked['cpu_per_request_us'] / front:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
