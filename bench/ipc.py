"""Which local channel carries a front end's requests to the engine and its answers back: the
measurement that chooses it (issue: front ends feeding one engine).

    python -m bench.ipc [--concurrency 64] [--duration 3] [--tensor-bytes 1024]

A front-end process keeps `concurrency` requests in flight to an engine process, which answers
each at once: a round trip of two small frames (a request's head, the answer's head) per request,
as the split will send them. Tensor bytes do not ride in the frames: each side writes them into a
shared-memory block that the other reads in place, as the split will, and that cost is measured
with them. Channels:
- unix: asyncio streams over a Unix socket, length-prefixed frames (standard library);
- unix-inline: the same, with the tensor bytes inside the frames instead (a copy into the socket
  and one out of it, each way), to show what shared memory saves at a given size;
- zmq: ZeroMQ DEALER/ROUTER over ipc:// with zmq.asyncio (pyzmq), one message per frame.
Prints round trips per second and CPU microseconds per round trip in each process.
"""

import argparse
import asyncio
import multiprocessing
import os
import resource
import struct
import sys
import tempfile
import time
from multiprocessing import shared_memory

HEAD = struct.Struct("<QIIQ")  # request id, model index, rows, shared-memory offset
LENGTH = struct.Struct("<I")
PADDING = b"x" * 96  # the rest of a head: names, shape, tenant, parameters


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def answer(frame: bytes, block: memoryview | None, tensor_bytes: int) -> bytes:
    """The engine's part of a round trip: read the request's tensor in place, write the answer's
    (without a block: the tensor rides in the frame, and so does the answer's)."""
    request_id, _, _, offset = HEAD.unpack_from(frame)
    if block is None:
        return HEAD.pack(request_id, 0, 1, 0) + PADDING + frame[HEAD.size + len(PADDING) :]
    slot = offset % (len(block) - 2 * tensor_bytes)
    block[slot + tensor_bytes : slot + 2 * tensor_bytes] = block[slot : slot + tensor_bytes]
    return HEAD.pack(request_id, 0, 1, slot + tensor_bytes) + PADDING


# --- Unix socket --------------------------------------------------------------------------------


async def unix_engine(path: str, block: memoryview | None, tensor_bytes: int, ready) -> float:
    served = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cpu = cpu_seconds()
        try:
            while True:
                (length,) = LENGTH.unpack(await reader.readexactly(4))
                frame = answer(await reader.readexactly(length), block, tensor_bytes)
                writer.write(LENGTH.pack(len(frame)) + frame)
        except asyncio.IncompleteReadError:
            served.set_result(cpu_seconds() - cpu)

    server = await asyncio.start_unix_server(serve, path)
    ready.set()
    cpu = await served
    server.close()
    return cpu


async def unix_front(path: str, concurrency: int, seconds: float, block: memoryview | None, tensor_bytes: int) -> tuple:
    reader, writer = await asyncio.open_unix_connection(path)
    waiting: dict[int, asyncio.Future] = {}

    async def read_answers() -> None:
        while True:
            (length,) = LENGTH.unpack(await reader.readexactly(4))
            frame = await reader.readexactly(length)
            waiting.pop(HEAD.unpack_from(frame)[0]).set_result(frame)

    async def call(request_id: int) -> None:
        tensor = b"\1" * tensor_bytes
        future = waiting[request_id] = asyncio.get_running_loop().create_future()
        if block is None:
            frame = HEAD.pack(request_id, 0, 1, 0) + PADDING + tensor
        else:
            slot = (request_id * tensor_bytes) % (len(block) // 2)
            block[slot : slot + tensor_bytes] = tensor
            frame = HEAD.pack(request_id, 0, 1, slot) + PADDING
        writer.write(LENGTH.pack(len(frame)) + frame)
        await future

    reading = asyncio.create_task(read_answers())
    result = await drive(call, concurrency, seconds)
    reading.cancel()
    writer.close()
    return result


# --- ZeroMQ -------------------------------------------------------------------------------------


async def zmq_engine(address: str, block: memoryview, tensor_bytes: int, ready) -> float:
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(address)
    ready.set()
    peer, frame = await socket.recv_multipart()
    cpu = cpu_seconds()
    while frame != b"end":
        socket.send_multipart((peer, answer(frame, block, tensor_bytes)), flags=zmq.NOBLOCK)
        try:  # what has arrived already, without a turn of the loop per message
            peer, frame = socket.recv_multipart(flags=zmq.NOBLOCK).result()
        except zmq.Again:
            peer, frame = await socket.recv_multipart()
    cpu = cpu_seconds() - cpu
    socket.close(0)
    context.term()
    return cpu


async def zmq_front(address: str, concurrency: int, seconds: float, block: memoryview, tensor_bytes: int) -> tuple:
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(address)
    waiting: dict[int, asyncio.Future] = {}

    async def read_answers() -> None:
        while True:
            try:  # what has arrived already, without a turn of the loop per message
                frame = socket.recv(flags=zmq.NOBLOCK).result()
            except zmq.Again:
                frame = await socket.recv()
            waiting.pop(HEAD.unpack_from(frame)[0]).set_result(frame)

    async def call(request_id: int) -> None:
        slot = (request_id * tensor_bytes) % (len(block) // 2)
        block[slot : slot + tensor_bytes] = b"\1" * tensor_bytes
        future = waiting[request_id] = asyncio.get_running_loop().create_future()
        socket.send(HEAD.pack(request_id, 0, 1, slot) + PADDING, flags=zmq.NOBLOCK)
        await future

    reading = asyncio.create_task(read_answers())
    result = await drive(call, concurrency, seconds)
    await socket.send(b"end")
    reading.cancel()
    socket.close(1000)
    context.term()
    return result


# --- both ---------------------------------------------------------------------------------------


async def drive(call, concurrency: int, seconds: float) -> tuple[int, float, float]:
    """(round trips, wall seconds, CPU seconds) of `concurrency` callers for `seconds`."""
    ids, count = iter(range(1 << 62)), 0
    ends = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal count
        while time.monotonic() < ends:
            await call(next(ids))
            count += 1

    cpu, wall = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return count, time.perf_counter() - wall, cpu_seconds() - cpu


def engine_process(channel: str, address: str, block_name: str, tensor_bytes: int, ready, results) -> None:
    block = shared_memory.SharedMemory(block_name)
    try:
        if channel.startswith("unix"):
            buffer = None if channel == "unix-inline" else block.buf
            cpu = asyncio.run(unix_engine(address, buffer, tensor_bytes, ready))
        else:
            cpu = asyncio.run(zmq_engine(address, block.buf, tensor_bytes, ready))
        results.put(cpu)
    finally:
        block.close()


def measure(channel: str, concurrency: int, seconds: float, tensor_bytes: int, scratch: str) -> dict:
    block = shared_memory.SharedMemory(create=True, size=64 << 20)
    address = os.path.join(scratch, f"{channel}.sock")
    address = f"ipc://{address}" if channel == "zmq" else address
    spawn = multiprocessing.get_context("spawn")
    ready, results = spawn.Event(), spawn.Queue()
    engine = spawn.Process(target=engine_process, args=(channel, address, block.name, tensor_bytes, ready, results))
    engine.start()
    try:
        ready.wait(30)
        front = unix_front if channel.startswith("unix") else zmq_front
        buffer = None if channel == "unix-inline" else block.buf
        count, wall, front_cpu = asyncio.run(front(address, concurrency, seconds, buffer, tensor_bytes))
        engine_cpu = results.get(timeout=30)
    finally:
        engine.join(10)
        block.close()
        block.unlink()
    return {
        "round_trips_per_second": count / wall,
        "front_cpu_us": front_cpu / count * 1e6,
        "engine_cpu_us": engine_cpu / count * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ipc", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--tensor-bytes", type=int, default=1024, help="each request's and answer's tensor bytes")
    parser.add_argument("--rounds", type=int, default=3, help="each channel this many times, interleaved")
    args = parser.parse_args(argv)
    channels = ["unix", "unix-inline"]
    try:
        import zmq  # noqa: F401 - only to know whether this channel can be measured here
    except ImportError:
        print("pyzmq is not installed: the zmq channel is not measured", file=sys.stderr)
    else:
        channels.append("zmq")
    print(f"concurrency {args.concurrency}, {args.tensor_bytes} tensor bytes each way through shared memory")
    print("channel      round trips/s  front CPU us  engine CPU us")
    with tempfile.TemporaryDirectory(prefix="onnxserve-ipc-") as scratch:
        for _ in range(args.rounds):
            for channel in channels:
                figures = measure(channel, args.concurrency, args.duration, args.tensor_bytes, scratch)
                print(
                    f"{channel:11} {figures['round_trips_per_second']:14,.0f} {figures['front_cpu_us']:13.1f}"
                    f" {figures['engine_cpu_us']:14.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
