"""The stop on the first SIGTERM/SIGINT, bounded by --exit-timeout-secs (README, "Command line").

The drain takes the timeout at most: health turns NOT_SERVING, gRPC and REST answer the requests in
flight and refuse new ones, loads under way finish or are given up, batches drain. What is still
running past it is given GIVE_UP_SECONDS (server/models/repository.py) to stop by itself, then left
behind. The last steps follow: the usage log's last records to disk, /metrics and NVML closed,
within what is left of the timeout and at least LAST_STEPS_SECONDS.

So the worst case is the timeout, plus uvicorn's 0.1 s pause before its own graceful wait, plus
GIVE_UP_SECONDS for each kind of work given up (a load's step, a batch: 2 s at most), plus
LAST_STEPS_SECONDS when the drain used the whole timeout and the disk does not answer: 4.1 s in
all for a timeout of 2 s with a batch and the disk stuck (tests/integration/test_limits_config.py).
"""

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from server.engine.energy import SampledMeters
from server.engine.inference import InferenceCore
from server.engine.usage_log import UsageLog
from server.frontend.grpc_server import GrpcServer
from server.frontend.metrics_server import MetricsServer
from server.frontend.request_limits import Offload
from server.models.load_deadline import settle
from server.models.repository import ModelRepository
from server.observe.metrics import GpuReader

log = logging.getLogger("onnxserve")

# Exit codes (README, "Command line"): 0 a clean stop; 2 a setting refused at start; 3 usage records
# could not be written (the log says how many); 4 a stop past --exit-timeout-secs with work still
# running in worker threads (a load's step, a batch, a codec job), left behind; 130 a second signal.
USAGE_RECORDS_LOST_EXIT_CODE = 3
ABANDONED_EXIT_CODE = 4
# The last steps get what is left of the timeout, and at least this: a disk that answers at all
# writes and fsyncs one period's records in milliseconds, and a billing record is worth waiting for.
LAST_STEPS_SECONDS = 1.0


@dataclass
class Serving:
    """What the stop has to stop."""

    grpc: GrpcServer | None
    http: Any  # uvicorn.Server, imported only with HTTP on; None with it off
    core: InferenceCore
    offload: Offload
    repository: ModelRepository
    usage: UsageLog | None
    metrics: MetricsServer
    energy: SampledMeters
    gpus: GpuReader | None
    tasks: list[asyncio.Task]  # the start-up loads and the followers (readiness, keys, polling)


async def stop(serving: Serving, exit_timeout: float) -> int:
    """Drain, then the last steps; returns the exit status, or exits the process (see exit_code)."""
    log.info("shutting down: refusing new requests, answering those in flight (up to %.1f s)", exit_timeout)
    loop = asyncio.get_running_loop()
    ends = loop.time() + exit_timeout
    for task in serving.tasks:
        task.cancel()
    serving.core.shutting_down = True
    if serving.grpc is not None:  # None with front ends in processes of their own: they stopped first
        await serving.grpc.health.enter_graceful_shutdown()
    await asyncio.gather(
        *([serving.grpc.server.stop(exit_timeout)] if serving.grpc else []),
        *([serving.http.shutdown()] if serving.http else []),
    )
    still_running = await serving.repository.close(max(0.0, ends - loop.time()))
    still_running += serving.offload.close()
    lost = await _last_steps(serving, max(LAST_STEPS_SECONDS, ends - loop.time()))
    return exit_code(still_running, lost)


async def _last_steps(serving: Serving, seconds: float) -> int:
    """The usage log's last records to disk and, beside it, /metrics and NVML closed, both within
    `seconds`. Returns the number of usage records not known to be written."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + seconds
    closed = loop.create_future()
    # A daemon thread, not the loop's executor, whose threads asyncio.run joins at exit: NVML can hang
    # in the driver, and /metrics waits up to 3 s for a scrape that holds its loop.
    threading.Thread(target=_close_monitoring, args=(serving, loop, closed), name="closing", daemon=True).start()
    lost = 0
    if serving.usage is not None:  # every request is answered by now: its record is the last to go to disk
        lost = await asyncio.to_thread(serving.usage.close, seconds)
    done, _ = await asyncio.wait((closed,), timeout=max(0.0, ends - loop.time()))
    if done:
        closed.result()  # its error, as when these ran on the loop
    else:
        log.warning("/metrics and NVML did not close within %.1f s: left to the process's end", seconds)
    return lost


def _close_monitoring(serving: Serving, loop: asyncio.AbstractEventLoop, closed: asyncio.Future) -> None:
    """In order: no scrape reads NVML, nor the energy sampler, when it shuts down."""
    error = None
    try:
        serving.metrics.shutdown()
        serving.energy.close()
        if serving.gpus:
            serving.gpus.close()
    except Exception as err:  # noqa: BLE001 - handed to the stop, which raises it
        error = err
    try:
        loop.call_soon_threadsafe(settle, closed, None, error)
    except RuntimeError:  # the loop is closed: the stop gave up waiting and returned
        log.debug("closing /metrics and NVML ended after the stop")


def exit_code(still_running: list[str], lost: int) -> int:
    """The exit status; with threads still running, the process exits here without waiting for them:
    asyncio.run and the interpreter would join them, and a thread in onnxruntime cannot be stopped."""
    code = USAGE_RECORDS_LOST_EXIT_CODE if lost else 0
    if not still_running:
        log.info("stopped%s", f" (exit {code})" if code else "")
        return code
    code = code or ABANDONED_EXIT_CODE
    log.warning(
        "stopped with %d thread(s) still running past --exit-timeout-secs, left behind: %s (exit %d)",
        len(still_running),
        "; ".join(still_running),
        code,
    )
    logging.shutdown()  # the log's last lines reach stderr: os._exit skips every other flush
    os._exit(code)
