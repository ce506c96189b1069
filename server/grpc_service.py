"""The gRPC transport: inference.GRPCInferenceService's RPCs over the transport-neutral core
(inference.py), and the one table from domain errors to gRPC status codes."""

import asyncio
import collections
import logging
from dataclasses import dataclass, field

import grpc

from server import errors, protocol
from server.batching import Answer
from server.config import PROTOCOL_GROUPS, RestrictedProtocol
from server.control import RepositoryControl, restricted
from server.errors import ServingError, Unauthenticated
from server.identity import AUTHORIZATION, TENANT_HEADER, Identity
from server.inference import GRPC, Call, InferenceCore, outcome_of
from server.model_info import EXTENSIONS, PLATFORM, SERVER_NAME, server_version, model_config_proto, ready_versions, statistics_response
from server.statistics import StatisticsRecorder
from server.tensors import decode_request, encode_outputs
from server.tls import grpc_client_name

log = logging.getLogger(__name__)

STATUS = {
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.LoadFailed: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ControlDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
# Open to every caller, so that probes need no key; the inference RPCs identify their caller themselves.
WITHOUT_KEY = (*PROTOCOL_GROUPS["health"], *PROTOCOL_GROUPS["inference"])


@dataclass(slots=True)
class _Stream:
    """One ModelStreamInfer call: answers to send, and its requests still queued or running."""

    answers: collections.deque = field(default_factory=collections.deque)  # None ends the stream
    wakeup: asyncio.Future | None = None  # while the writer waits for the next answer
    queued: dict = field(default_factory=dict)  # QueuedRequest -> (Call, its ModelInferRequest)
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


class InferenceService:
    """The v2 RPCs. `handler()` registers them with a grpc.aio server."""

    def __init__(
        self,
        core: InferenceCore,
        statistics: StatisticsRecorder,
        control: RepositoryControl,
        restricted: tuple[RestrictedProtocol, ...] = (),
    ) -> None:
        self.core = core
        self.repository = core.repository
        self.statistics = statistics
        self.control = control
        self.restricted = {method: rule for rule in restricted for method in rule.methods}

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in protocol.SERVICE.methods:
            implementation = getattr(self, method.name, None) or getattr(self.control, method.name, None)
            if implementation is not None and method.name in self.restricted:
                implementation = restricted(implementation, self.restricted[method.name], method.server_streaming)
            if implementation is not None and method.name not in WITHOUT_KEY and self.core.auth.keys is not None:
                implementation = self._authenticated(implementation)
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

    def identity(self, context) -> Identity:
        """Who is calling, from the call's metadata and client certificate; Unauthenticated when
        keys are required and it has no valid one."""
        auth = self.core.auth
        if not auth.reads_calls:  # nothing configured to read: skip the metadata
            return auth.anonymous
        authorization = header = None
        for key, value in context.invocation_metadata():
            if key == AUTHORIZATION:
                authorization = value
            elif key == TENANT_HEADER:
                header = value
        certificate = grpc_client_name(context) if auth.mutual_tls else None
        return auth.identify(authorization, certificate, header)

    def _authenticated(self, implementation):
        async def call(request, context):
            self.identity(context)
            return await implementation(request, context)

        return call

    # --- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request, context):
        return protocol.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return protocol.ServerReadyResponse(ready=self.core.ready())

    async def ModelReady(self, request, context):
        ready = not self.core.shutting_down and self.repository.is_ready(request.name, request.version)
        return protocol.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return protocol.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        model = self.repository.get(request.name, request.version)
        response = protocol.ModelMetadataResponse(
            name=model.name, versions=ready_versions(self.repository, model.name), platform=PLATFORM
        )
        for spec in model.signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    async def ModelConfig(self, request, context):
        model = self.repository.get(request.name, request.version)
        return protocol.ModelConfigResponse(config=model_config_proto(model))

    # --- inference ----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        return await self.infer(request, self.identity(context))

    async def ModelStreamInfer(self, requests, context):
        """Triton's stream: requests run concurrently (so they batch), and each is answered on
        the stream as it completes; a failure is that answer's error_message, not the stream's."""
        try:
            identity = self.identity(context)
        except Unauthenticated as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        stream = _Stream()
        reader = asyncio.create_task(self._answer_each(requests, stream, identity))
        try:
            while (answer := await stream.get()) is not None:
                yield answer
            await reader  # raises what broke the reading, if anything did
        finally:
            reader.cancel()  # the client went away: its requests still queued are dropped

    async def _answer_each(self, requests, stream: "_Stream", identity: Identity) -> None:
        """Queue each request as it arrives, without a task of its own: a callback answers it when
        its batch is done. Returns once every request read is answered."""
        try:
            async for request in requests:
                self._stream_one(request, self.core.start(GRPC, identity), stream)
            if stream.queued:
                stream.idle = asyncio.get_running_loop().create_future()
                await stream.idle
        finally:
            for item, (call, _) in list(stream.queued.items()):
                call.model.batcher.cancel(item)
            stream.put(None)

    def _stream_one(self, request, call: Call, stream: "_Stream") -> None:
        try:
            item = self.core.enqueue(call, self._decoded(request, call), _parameters(request))
        except ServingError as err:
            self._stream_error(request, call, stream, str(err), outcome_of(err, "rejected"))
            return
        except Exception:  # one bad request must not end the stream, nor its neighbours
            log.exception("ModelStreamInfer failed")
            self._stream_error(request, call, stream, "ModelStreamInfer: internal error; the server log has details", "error")
            return
        stream.queued[item] = (call, request)
        item.future.add_done_callback(lambda done: self._stream_done(request, call, stream, item, done))

    def _stream_done(self, request, call: Call, stream: "_Stream", item, done: asyncio.Future) -> None:
        stream.queued.pop(item, None)
        if done.cancelled():  # the stream went away; nobody is left to answer
            self.core.finished(call, "cancelled")
        elif isinstance(error := done.exception(), ServingError):
            self._stream_error(request, call, stream, str(error), outcome_of(error, "error"))
        else:
            try:
                if error is not None:
                    raise error
                answer = protocol.ModelStreamInferResponse()
                call.answer = done.result()
                self._respond(request, call, call.answer, answer.infer_response)
            except Exception:
                log.exception("ModelStreamInfer failed")
                self._stream_error(request, call, stream, "ModelStreamInfer: internal error; the server log has details", "error")
            else:
                stream.put(answer)
                self.core.finished(call, "ok")
        if not stream.queued and stream.idle is not None and not stream.idle.done():
            stream.idle.set_result(None)

    def _stream_error(self, request, call: Call, stream: "_Stream", message: str, outcome: str) -> None:
        echo = protocol.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        stream.put(protocol.ModelStreamInferResponse(error_message=message, infer_response=echo))
        self.core.finished(call, outcome)

    async def infer(self, request, identity: Identity):
        """One ModelInferRequest to its response; raises ServingError for the caller to report."""
        with self.core.request(GRPC, identity) as call:
            answer = await self.core.infer(call, self._decoded(request, call), _parameters(request))
            return self._respond(request, call, answer, protocol.ModelInferResponse())

    def _decoded(self, request, call: Call):
        call.request_id = request.id
        model = self.core.resolve(call, request.model_name, request.model_version)
        return decode_request(request, model.signature)

    def _respond(self, request, call: Call, answer: Answer, response):
        """Fill `response`, a ModelInferResponse (a stream's is built in place, not copied in)."""
        model = call.model
        response.model_name, response.model_version, response.id = model.name, model.version, request.id
        encode_outputs(response, ((model.signature.output(name), answer.outputs[name]) for name in call.outputs))
        parameters = response.parameters
        for key, value in self.core.accounting(call, answer):
            if isinstance(value, str):
                parameters[key].string_param = value
            elif isinstance(value, float):
                parameters[key].double_param = value
            else:
                parameters[key].int64_param = value
        return response

    # --- statistics ---------------------------------------------------------------------------

    async def ModelStatistics(self, request, context):
        """Triton's counts and durations, plus what each version cost (an onnxserve field)."""
        return statistics_response(self.repository, self.statistics, self.core.ledger, request.name, request.version)


def _parameters(request) -> dict[str, object]:
    """A request's parameters as Python values (most requests have none)."""
    if not request.parameters:
        return {}
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in request.parameters.items()}


def _guarded(method: str, implementation):
    async def call(request, context):
        try:
            return await implementation(request, context)
        except ServingError as err:
            await context.abort(STATUS.get(type(err), grpc.StatusCode.UNKNOWN), str(err))
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
