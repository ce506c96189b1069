"""gRPC servicer of inference.GRPCInferenceService, and the one table from
domain errors to gRPC status codes."""

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from importlib import metadata

import grpc

from server import protocol
from server.config import RestrictedProtocol
from server.control import RepositoryControl, restricted
from server.errors import (
    ControlDisabled,
    DeadlineExceeded,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PermissionDenied,
    ServingError,
    ShuttingDown,
)
from server.batching import Answer
from server.costs import CostLedger
from server.events import EventBus, RequestFinished, RequestStarted
from server.model_info import PLATFORM, fill_statistics, model_config_proto
from server.repository import READY, ModelRepository, ModelVersion
from server.statistics import StatisticsRecorder
from server.tensors import decode_request, encode_outputs

log = logging.getLogger(__name__)

STATUS = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    LoadFailed: grpc.StatusCode.INVALID_ARGUMENT,
    ControlDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
OUTCOMES = {InvalidInput: "invalid", Overloaded: "rejected", DeadlineExceeded: "timeout", ModelNotFound: "invalid"}
EXTENSIONS = (
    "model_configuration", "model_repository", "schedule_policy", "parameters", "binary_tensor_data", "statistics",
)  # fmt: skip
# Response parameters that tell a caller what its own request went through and cost.
COST_PARAMETER = "onnxserve_cost_dollars"
ENERGY_PARAMETER = "onnxserve_energy_joules"
DEVICE_PARAMETER = "onnxserve_device"
QUEUE_PARAMETER = "onnxserve_queue_us"
COMPUTE_PARAMETER = "onnxserve_compute_us"
BATCH_PARAMETER = "onnxserve_batch_rows"
BATCH_ID_PARAMETER = "onnxserve_batch_id"


@dataclass(slots=True)
class Call:
    """One inference request on its way through the server."""

    request: object  # ModelInferRequest
    started: float  # perf_counter()
    model: ModelVersion | None = None  # once the name resolved: its events carry the labels
    rows: int = 0
    outputs: tuple[str, ...] = ()


@dataclass(slots=True)
class _Stream:
    """One ModelStreamInfer call: answers to send, and its requests still queued or running."""

    answers: collections.deque = field(default_factory=collections.deque)  # None ends the stream
    wakeup: asyncio.Future | None = None  # while the writer waits for the next answer
    queued: dict = field(default_factory=dict)  # QueuedRequest -> Call
    idle: asyncio.Future | None = None  # resolved once the last request read is answered

    def put(self, answer) -> None:
        self.answers.append(answer)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def get(self):
        while not self.answers:
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        return self.answers.popleft()


def server_version() -> str:
    try:
        return metadata.version("onnxserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class InferenceService:
    """The v2 RPCs. `handler()` registers them with a grpc.aio server."""

    def __init__(
        self,
        repository: ModelRepository,
        bus: EventBus,
        strict_readiness: bool,
        ledger: CostLedger,
        statistics: StatisticsRecorder,
        control: RepositoryControl,
        restricted: tuple[RestrictedProtocol, ...] = (),
    ) -> None:
        self.repository = repository
        self.control = control
        self.restricted = {method: rule for rule in restricted for method in rule.methods}
        self.bus = bus
        self.ledger = ledger
        self.statistics = statistics
        self.strict_readiness = strict_readiness
        self.shutting_down = False
        self.version = server_version()

    def ready(self) -> bool:
        if self.shutting_down or not self.repository.loaded:
            return False
        return self.repository.all_ready() or not self.strict_readiness

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in protocol.SERVICE.methods:
            implementation = getattr(self, method.name, None) or getattr(self.control, method.name, None)
            if implementation is not None and method.name in self.restricted:
                implementation = restricted(implementation, self.restricted[method.name], method.server_streaming)
            deserialize = protocol.request_class(method.name).FromString
            serialize = protocol.response_class(method.name).SerializeToString
            if method.client_streaming or method.server_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    _unimplemented_stream(method.name) if implementation is None else implementation,
                    deserialize,
                    serialize,
                )
            elif implementation is None:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unimplemented(method.name), deserialize, serialize
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _guarded(method.name, implementation), deserialize, serialize
                )
        return grpc.method_handlers_generic_handler(protocol.SERVICE_NAME, handlers)

    # --- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request, context):
        return protocol.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return protocol.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request, context):
        ready = not self.shutting_down and self.repository.is_ready(request.name, request.version)
        return protocol.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return protocol.ServerMetadataResponse(name="onnxserve", version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        model = self.repository.get(request.name, request.version)
        response = protocol.ModelMetadataResponse(
            name=model.name, versions=self._ready_versions(model.name), platform=PLATFORM
        )
        for spec in model.signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    def _ready_versions(self, name: str) -> list[str]:
        return [v for v in self.repository.version_names(name) if self.repository.models[name].versions[v].state == READY]

    async def ModelConfig(self, request, context):
        model = self.repository.get(request.name, request.version)
        return protocol.ModelConfigResponse(config=model_config_proto(model))

    # --- inference ----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        return await self.infer(request)

    async def ModelStreamInfer(self, requests, context):
        """Triton's stream: requests run concurrently (so they batch), and each is answered on
        the stream as it completes; a failure is that answer's error_message, not the stream's."""
        stream = _Stream()
        reader = asyncio.create_task(self._answer_each(requests, stream))
        try:
            while (answer := await stream.get()) is not None:
                yield answer
            await reader  # raises what broke the reading, if anything did
        finally:
            reader.cancel()  # the client went away: its requests still queued are dropped

    async def _answer_each(self, requests, stream: "_Stream") -> None:
        """Queue each request as it arrives, without a task of its own: a callback answers it when
        its batch is done. Returns once every request read is answered."""
        try:
            async for request in requests:
                self._stream_one(Call(request, time.perf_counter()), stream)
            if stream.queued:
                stream.idle = asyncio.get_running_loop().create_future()
                await stream.idle
        finally:
            for item, call in list(stream.queued.items()):
                call.model.batcher.cancel(item)
            stream.put(None)

    def _stream_one(self, call: "Call", stream: "_Stream") -> None:
        try:
            feeds, priority, timeout_us = self._admit(call)
            item = call.model.batcher.enqueue(feeds, call.rows, call.outputs, priority=priority, timeout_us=timeout_us)
        except ServingError as err:
            self._stream_error(call, stream, str(err), OUTCOMES.get(type(err), "rejected"))
            return
        except Exception:  # one bad request must not end the stream, nor its neighbours
            log.exception("ModelStreamInfer failed")
            self._stream_error(call, stream, "ModelStreamInfer: internal error; the server log has details", "error")
            return
        stream.queued[item] = call
        item.future.add_done_callback(lambda done: self._stream_done(call, stream, item, done))

    def _stream_done(self, call: "Call", stream: "_Stream", item, done: asyncio.Future) -> None:
        stream.queued.pop(item, None)
        if done.cancelled():  # the stream went away; nobody is left to answer
            self._finished(call, "cancelled")
        elif isinstance(error := done.exception(), ServingError):
            self._stream_error(call, stream, str(error), OUTCOMES.get(type(error), "error"))
        else:
            try:
                if error is not None:
                    raise error
                answer = protocol.ModelStreamInferResponse()
                self._respond(call, done.result(), answer.infer_response)
            except Exception:
                log.exception("ModelStreamInfer failed")
                self._stream_error(call, stream, "ModelStreamInfer: internal error; the server log has details", "error")
            else:
                stream.put(answer)
                self._finished(call, "ok")
        if not stream.queued and stream.idle is not None and not stream.idle.done():
            stream.idle.set_result(None)

    def _stream_error(self, call: "Call", stream: "_Stream", message: str, outcome: str) -> None:
        request = call.request
        echo = protocol.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        stream.put(protocol.ModelStreamInferResponse(error_message=message, infer_response=echo))
        self._finished(call, outcome)

    async def infer(self, request):
        """One ModelInferRequest to its response; raises ServingError for the caller to report."""
        call, outcome = Call(request, time.perf_counter()), "error"
        try:
            feeds, priority, timeout_us = self._admit(call)
            answer = await call.model.batcher.submit(feeds, call.rows, call.outputs, priority=priority, timeout_us=timeout_us)
            response = self._respond(call, answer, protocol.ModelInferResponse())
            outcome = "ok"
            return response
        except ServingError as err:
            outcome = OUTCOMES.get(type(err), "rejected")
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._finished(call, outcome)

    def _admit(self, call: "Call") -> tuple[dict, int, int]:
        """Resolve the model and decode the request: (feeds, priority, timeout_us); raises ServingError."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        request = call.request
        model = call.model = self.repository.get(request.model_name, request.model_version)
        self.bus.publish(RequestStarted(model.name, model.version))
        decoded = decode_request(request, model.signature)
        call.rows, call.outputs = decoded.rows, decoded.outputs
        priority, timeout_us = request_options(request, model)
        return decoded.feeds, priority, timeout_us

    def _respond(self, call: "Call", answer: Answer, response):
        """Fill `response`, a ModelInferResponse (a stream's is built in place, not copied in)."""
        model = call.model
        response.model_name, response.model_version, response.id = model.name, model.version, call.request.id
        encode_outputs(response, ((model.signature.output(name), answer.outputs[name]) for name in call.outputs))
        self._account(response, answer, call.rows)
        return response

    def _finished(self, call: "Call", outcome: str) -> None:
        if call.model is not None:  # unknown names would make unbounded label values
            model = call.model
            self.bus.publish(RequestFinished(model.name, model.version, outcome, call.rows, time.perf_counter() - call.started))

    def _account(self, response, answer: Answer, rows: int) -> None:
        parameters = response.parameters
        parameters[QUEUE_PARAMETER].int64_param = round(answer.queue_seconds * 1e6)
        parameters[COMPUTE_PARAMETER].int64_param = round(answer.compute_seconds * 1e6)
        parameters[BATCH_PARAMETER].int64_param = answer.batch_rows
        parameters[BATCH_ID_PARAMETER].int64_param = answer.batch_id
        parameters[DEVICE_PARAMETER].string_param = answer.device
        share = self.ledger.share(answer.batch_id, rows)
        if share is None:  # only when thousands of batches finished before this caller resumed
            log.warning("cost of batch %d was forgotten before its response was sent", answer.batch_id)
            return
        parameters[COST_PARAMETER].double_param = share.dollars
        if share.joules is not None:
            parameters[ENERGY_PARAMETER].double_param = share.joules

    # --- statistics ---------------------------------------------------------------------------

    async def ModelStatistics(self, request, context):
        """Triton's counts and durations, plus what each version cost (an onnxserve field)."""
        if request.name:
            chosen = [self.repository.get(request.name, request.version)]
        else:
            chosen = [
                self.repository.models[name].versions[version]
                for name in sorted(self.repository.models)
                for version in self.repository.version_names(name)
                if self.repository.models[name].versions[version].state == READY
            ]
        costs = self.ledger.snapshot().models
        response = protocol.ModelStatisticsResponse()
        for model in chosen:
            fill_statistics(response.model_stats.add(), model, self.statistics, costs)
        return response


def request_options(request, model: ModelVersion) -> tuple[int, int]:
    """The reserved `priority` and `timeout` (microseconds) request parameters."""
    values = []
    for key in ("priority", "timeout"):
        if key not in request.parameters:
            values.append(0)
            continue
        parameter = request.parameters[key]
        choice = parameter.WhichOneof("parameter_choice")
        if choice not in ("int64_param", "uint64_param") or getattr(parameter, choice) < 0:
            raise InvalidInput(
                f"{model.signature.label}: parameter '{key}' must be a non-negative integer; got {choice} "
                f"{getattr(parameter, choice) if choice else 'unset'}"
            )
        values.append(getattr(parameter, choice))
    return values[0], values[1]


def _guarded(method: str, implementation):
    async def call(request, context):
        try:
            return await implementation(request, context)
        except ServingError as err:
            await context.abort(STATUS[type(err)], str(err))
        except Exception:
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error; the server log has details")

    return call


def _unimplemented(method: str):
    async def call(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"onnxserve does not implement {method} yet")

    return call


def _unimplemented_stream(method: str):
    async def call(request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"onnxserve does not implement {method} yet; use ModelInfer")
        yield  # makes this an async generator, which grpc.aio expects of a streaming handler

    return call
