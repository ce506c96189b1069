"""Bounds on what one inference request may make the server hold or do, each checked before the
work it bounds, and the hand-off of big requests' decoding and big answers' encoding to a small
pool of worker threads, so that one caller's tensors never stall the event loop for the others."""

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidInput

# Decoding or encoding that weighs more than this leaves the loop. The weight counts the work done
# in Python per element or per byte of JSON (a byte each, ELEMENT_COST an element): ~3 ms at most
# for 64 KiB of tiny JSON values, what a loop can afford, against a hop to a thread of 0.03-0.1 ms.
OFFLOAD_BYTES = 64 * 1024
# One element of a BYTES tensor, of typed contents, or of any output as a JSON list: a Python
# object made or read (~0.1-0.2 us), weighed like 32 bytes of JSON.
ELEMENT_COST = 32
# Raw numbers cost no Python per element: decoded by np.frombuffer on the wire bytes (no copy at
# all), encoded by one memcpy (~10 GB/s) into the response. A raw byte weighs this fraction of a
# JSON byte, so answers up to 1 MiB (a copy of ~0.05 ms, no longer than the hop) stay on the loop.
RAW_COPY_SHARE = 16
# No tensor may claim more elements than this, zero dimensions ignored: numpy cannot reshape past
# 2**63 bytes (a 500 before), and no message or body we accept carries a trillion elements.
MAX_DECLARED_ELEMENTS = 1 << 40
# Dims of a request's tensor: it must equal its model's rank, which configs bound at 32
# (model_limits.MAX_RANK) and ONNX models keep to 8 in practice. Checked before a shape is built.
MAX_REQUEST_RANK = 64
SHOWN_DIMS = 8  # of a shape quoted back in an error message
CODEC_THREADS = 2  # see Offload


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds; ServerSettings gives each a flag (app.py builds this from it).

    BYTES elements and JSON values are capped by count, not by bytes: each becomes a Python object
    of ~50-60 bytes (plus onnxruntime's own 32-byte std::string for BYTES) however short it is on
    the wire, so a cap on bytes alone lets 2-byte elements cost 16x the request. Keeping BYTES as
    a length-prefixed buffer would avoid that only until onnxruntime, which takes nothing but
    Python str for string tensors; so the count is what bounds the memory, and the cap is it."""

    max_bytes_elements: int = 1 << 20  # BYTES elements in one request, all its inputs together
    # Values in a REST request's JSON (counted as its commas). orjson parses the whole body in one
    # call that holds the GIL, ~40-70 ns a value on a small core: 2M values stall everyone ~100 ms.
    max_json_values: int = 1 << 21
    max_id_bytes: int = 256  # of the request's `id` (UTF-8)
    max_parameters: int = 64  # entries in the request's `parameters`
    # Numeric values in a gRPC request's typed contents (int_contents, fp32_contents...), all its
    # inputs together: 64 MiB as FP32. Typed contents are the slow path (tritonclient sends raw
    # contents): each value is parsed by protobuf into its arena (a one-byte varint becomes 8
    # bytes) and converted one by one, so a 256 MiB message could hold 256M of them, gigabytes
    # and seconds of GIL; big tensors go as raw_input_contents, which have no such cap.
    max_typed_elements: int = 1 << 24

    @classmethod
    def from_settings(cls, settings) -> "RequestLimits":
        """From ServerSettings' fields of the same names."""
        return cls(
            settings.max_bytes_elements,
            settings.max_json_values,
            settings.max_id_bytes,
            settings.max_request_parameters,
            settings.max_typed_elements,
        )

    def check_id(self, value, label: str) -> str:
        """The request's `id` as the usage log and the response carry it: a short string."""
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InvalidInput(f"{label}: 'id' must be a string; got {type(value).__name__}")
        if len(value) > self.max_id_bytes or len(value.encode()) > self.max_id_bytes:
            raise InvalidInput(
                f"{label}: 'id' ({len(value)} characters) is longer than {self.max_id_bytes} bytes (--max-id-bytes)"
            )
        return value

    def check_parameters(self, count: int, label: str) -> None:
        if count > self.max_parameters:
            raise InvalidInput(
                f"{label}: 'parameters' has {count} entries; at most {self.max_parameters} (--max-request-parameters)"
            )


DEFAULT_LIMITS = RequestLimits()


class ElementBudget:
    """Elements of one kind that one request may still carry, spent input by input before any is
    built: BYTES elements (bytes_budget) and gRPC typed numeric values (typed_budget)."""

    def __init__(self, most: int, refusal: str) -> None:
        self.left, self.most, self.refusal = most, most, refusal  # refusal: a format of total and most

    def spend(self, count: int, where: str) -> None:
        if count > self.left:
            raise InvalidInput(f"{where}: " + self.refusal.format(total=self.most - self.left + count, most=self.most))
        self.left -= count


def bytes_budget(limits: RequestLimits) -> ElementBudget:
    return ElementBudget(
        limits.max_bytes_elements,
        "the request declares {total} BYTES elements; at most {most} per request (--max-bytes-elements)",
    )


def typed_budget(limits: RequestLimits) -> ElementBudget:
    """A big message's typed values were counted on the wire already, before protobuf parsed them."""
    return ElementBudget(
        limits.max_typed_elements,
        "the request has {total} typed values; at most {most} per request (--max-typed-elements): "
        "send big tensors as raw_input_contents",
    )


def declared_count(shape: tuple[int, ...], where: str) -> int:
    """The element count of a checked shape; refuses counts no request can carry."""
    nonzero = 1
    for dim in shape:
        nonzero *= dim or 1
        if nonzero > MAX_DECLARED_ELEMENTS:
            raise InvalidInput(
                f"{where}: shape {shape_text(shape)} declares more than {MAX_DECLARED_ELEMENTS} elements"
            )
    return 0 if 0 in shape else nonzero


def shape_text(shape) -> str:
    """A shape for an error message: the first dims of a long one, and how many there are."""
    if len(shape) <= SHOWN_DIMS:
        return str(list(shape))
    return f"[{', '.join(str(d) for d in shape[:SHOWN_DIMS])}, ... ({len(shape)} dims)]"


def encode_weight(array: np.ndarray, as_json: bool = False) -> int:
    """What encoding `array` weighs: what Offload compares with OFFLOAD_BYTES."""
    if not as_json and array.dtype != object:
        return array.nbytes // RAW_COPY_SHARE
    weight = array.size * ELEMENT_COST
    if array.dtype == object and weight <= OFFLOAD_BYTES:  # few elements, but perhaps long ones
        weight += sum(len(item) for item in array.reshape(-1))
    return weight


def raw_bytes_weight(size: int, declared: int | None = None) -> int:
    """What decoding `size` bytes of raw BYTES contents weighs: an element per declared one (at most
    one per 4-byte length prefix), and each byte, which is copied and checked as UTF-8."""
    elements = size // 4 + 1 if declared is None else min(declared, size // 4 + 1)
    return elements * ELEMENT_COST + size


class Offload:
    """Runs the decoding and encoding of big requests in worker threads of their own.

    A dedicated pool, not the loop's default executor, and a small one: a thread running Python
    holds the GIL for up to 5 ms slices, and every extra such thread is one more the loop may wait
    behind, so CODEC_THREADS bounds that wait (and the big requests half-decoded at once) whatever
    the number of callers. Their Python loops are kept short (numpy where it can do the work)."""

    def __init__(self, threads: int = CODEC_THREADS) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="codec")
        self._jobs: dict[Future, str] = {}  # submitted, not done yet: for close() to name

    async def run(self, weight: int, function, *args):
        """`function(*args)`: on the loop when `weight` is small, else in a codec thread."""
        if weight <= OFFLOAD_BYTES:
            return function(*args)
        return await self.in_thread(function, *args)

    async def in_thread(self, function, *args):
        job = self.executor.submit(function, *args)  # what run_in_executor does, keeping the job for close()
        self._jobs[job] = getattr(function, "__name__", "a request's decoding or encoding")
        job.add_done_callback(self._forget)  # after the entry: runs here at once if the job is done already
        return await asyncio.wrap_future(job)

    def _forget(self, job: Future) -> None:
        self._jobs.pop(job, None)

    def close(self) -> list[str]:
        """At stop, without waiting: work not started yet is dropped (its callers are gone) and no
        more is taken. Returns what codec threads still run: the interpreter would join them at exit,
        past --exit-timeout-secs if need be, so the stop leaves them behind as it does a batch."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        return [f"codec: {name}" for job, name in list(self._jobs.items()) if not job.done()]
