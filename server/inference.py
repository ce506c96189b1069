"""The transport-neutral request path, one for gRPC and HTTP: resolve the model version,
admit a decoded request into its batcher, say what the answer cost, and report how the
request ended. The transports decode before it and encode after it."""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

from server.batching import Answer, QueuedRequest
from server.costs import CostLedger
from server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, ServingError, ShuttingDown
from server.events import EventBus, RequestFinished, RequestStarted
from server.repository import ModelRepository, ModelVersion
from server.tensors import DecodedRequest

# Response parameters that tell a caller what its own request went through and cost.
COST_PARAMETER = "onnxserve_cost_dollars"
ENERGY_PARAMETER = "onnxserve_energy_joules"
DEVICE_PARAMETER = "onnxserve_device"
QUEUE_PARAMETER = "onnxserve_queue_us"
COMPUTE_PARAMETER = "onnxserve_compute_us"
BATCH_PARAMETER = "onnxserve_batch_rows"
BATCH_ID_PARAMETER = "onnxserve_batch_id"
GRPC, HTTP = "grpc", "http"
OUTCOMES = {InvalidInput: "invalid", Overloaded: "rejected", DeadlineExceeded: "timeout", ModelNotFound: "invalid"}

log = logging.getLogger(__name__)


def outcome_of(error: ServingError, default: str) -> str:
    """The `outcome` label of a request that ended with `error`."""
    return OUTCOMES.get(type(error), default)


@dataclass(slots=True)
class Call:
    """One inference request on its way through the server."""

    started: float  # perf_counter()
    protocol: str  # GRPC or HTTP
    model: ModelVersion | None = None  # once the name resolved: its events carry the labels
    rows: int = 0
    outputs: tuple[str, ...] = ()


class InferenceCore:
    def __init__(self, repository: ModelRepository, bus: EventBus, ledger: CostLedger, strict_readiness: bool) -> None:
        self.repository = repository
        self.bus = bus
        self.ledger = ledger
        self.strict_readiness = strict_readiness
        self.shutting_down = False

    def ready(self) -> bool:
        if self.shutting_down or not self.repository.loaded:
            return False
        return self.repository.all_ready() or not self.strict_readiness

    def start(self, protocol: str) -> Call:
        return Call(time.perf_counter(), protocol)

    @contextlib.contextmanager
    def request(self, protocol: str) -> Iterator[Call]:
        """One request from receipt to response: its outcome is reported however the block ends."""
        call, outcome = self.start(protocol), "error"
        try:
            yield call
            outcome = "ok"
        except ServingError as err:
            outcome = outcome_of(err, "rejected")
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.finished(call, outcome)

    def resolve(self, call: Call, name: str, version: str) -> ModelVersion:
        """The version that will answer; raises ShuttingDown, ModelNotFound or ModelNotReady."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        model = call.model = self.repository.get(name, version)
        self.bus.publish(RequestStarted(model.name, model.version))
        return model

    def enqueue(self, call: Call, decoded: DecodedRequest, parameters: Mapping[str, object]) -> QueuedRequest:
        """Queue a decoded request on its version's batcher; its future resolves with the Answer."""
        call.rows, call.outputs = decoded.rows, decoded.outputs
        priority, timeout_us = request_options(parameters, call.model)
        return call.model.batcher.enqueue(decoded.feeds, decoded.rows, decoded.outputs, priority=priority, timeout_us=timeout_us)

    async def infer(self, call: Call, decoded: DecodedRequest, parameters: Mapping[str, object]) -> Answer:
        """Queue a decoded request and wait for its own rows; a cancelled caller leaves the queue."""
        call.rows, call.outputs = decoded.rows, decoded.outputs
        priority, timeout_us = request_options(parameters, call.model)
        batcher = call.model.batcher
        return await batcher.submit(decoded.feeds, decoded.rows, decoded.outputs, priority=priority, timeout_us=timeout_us)

    def accounting(self, answer: Answer, rows: int) -> list[tuple[str, int | float | str]]:
        """The response parameters that say what this request went through and cost."""
        said: list[tuple[str, int | float | str]] = [
            (QUEUE_PARAMETER, round(answer.queue_seconds * 1e6)),
            (COMPUTE_PARAMETER, round(answer.compute_seconds * 1e6)),
            (BATCH_PARAMETER, answer.batch_rows),
            (BATCH_ID_PARAMETER, answer.batch_id),
            (DEVICE_PARAMETER, answer.device),
        ]
        share = self.ledger.share(answer.batch_id, rows)
        if share is None:  # only when thousands of batches finished before this caller resumed
            log.warning("cost of batch %d was forgotten before its response was sent", answer.batch_id)
            return said
        said.append((COST_PARAMETER, share.dollars))
        if share.joules is not None:
            said.append((ENERGY_PARAMETER, share.joules))
        return said

    def finished(self, call: Call, outcome: str) -> None:
        if call.model is not None:  # unknown names would make unbounded label values
            model = call.model
            seconds = time.perf_counter() - call.started
            self.bus.publish(RequestFinished(model.name, model.version, outcome, call.rows, seconds, call.protocol))


def request_options(parameters: Mapping[str, object], model: ModelVersion) -> tuple[int, int]:
    """The reserved `priority` and `timeout` (microseconds) request parameters."""
    if not parameters:
        return 0, 0
    values = []
    for key in ("priority", "timeout"):
        value = parameters.get(key)
        if value is None:
            values.append(0)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(
                f"{model.signature.label}: parameter '{key}' must be a non-negative integer; got {type(value).__name__} {value!r}"
            )
        values.append(value)
    return values[0], values[1]
