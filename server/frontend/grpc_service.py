"""The gRPC transport: inference.GRPCInferenceService's RPCs over the transport-neutral core
(server/engine/inference.py) and the rest of the Backend, and the one table from domain errors to
gRPC status codes. grpc_server.py builds and starts the server around it."""

import asyncio
import collections
import logging
from dataclasses import dataclass, field

import grpc

from server import errors, protocol
from server.config import PROTOCOL_GROUPS, RestrictedProtocol
from server.engine.batching import Answer
from server.engine.inference import GRPC, Call, Identity
from server.errors import ServingError, Unauthenticated
from server.frontend.backend import Backend
from server.frontend.grpc_codec import RequestHead, decode_weight, parse_on_loop, parse_request, request_head, response_bytes
from server.frontend.grpc_codec import response_weight, serialize_response
from server.frontend.identity import AUTHORIZATION, TENANT_HEADER
from server.frontend.model_info import EXTENSIONS, PLATFORM, SERVER_NAME, server_version
from server.frontend.request_limits import OFFLOAD_BYTES
from server.frontend.restricted import restricted
from server.frontend.tensor_codec import decode_request
from server.frontend.tls import grpc_client_name
from server.tensors import DecodedRequest

log = logging.getLogger(__name__)
# A stream's requests queued, running or answered but not yet sent, and the bytes of those answers,
# before its next message is read: far more than a client that reads its answers ever has in flight
# (so one that writes a burst before reading is not held back), while answers a client does not read
# cannot pile up without end.
STREAM_WINDOW = 4096
STREAM_WINDOW_BYTES = 64 << 20

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
# ModelReady is not open: it would tell anyone which model names exist (probes use ServerReady).
WITHOUT_KEY = ("ServerLive", "ServerReady", *PROTOCOL_GROUPS["inference"])


@dataclass(slots=True)
class _Stream:
    """One ModelStreamInfer call: answers to send, and its requests still queued or running.

    A client may send faster than it reads its answers, or than the model serves them: past
    STREAM_WINDOW requests queued or answered but unsent (or STREAM_WINDOW_BYTES of unsent answers),
    the stream's next message is not read until answers are sent, so HTTP/2's flow control holds
    the client back instead of our memory."""

    answers: collections.deque = field(default_factory=collections.deque)  # None ends the stream
    wakeup: asyncio.Future | None = None  # while the writer waits for the next answer
    queued: dict = field(default_factory=dict)  # QueuedRequest -> (Call, its encoding task or None)
    idle: asyncio.Future | None = None  # resolved once the last request read is answered
    roomy: asyncio.Future | None = None  # while the reader waits for the window to open
    unsent: int = 0  # bytes of the answers waiting to be sent

    def put(self, answer) -> None:
        self.answers.append(answer)
        self.unsent += len(answer) if isinstance(answer, bytes) else 0
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def get(self):
        while not self.answers:
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        answer = self.answers.popleft()
        self.unsent -= len(answer) if isinstance(answer, bytes) else 0
        if self.roomy is not None and not self.roomy.done():
            self.roomy.set_result(None)
        return answer

    async def room(self) -> None:
        """Back once fewer than STREAM_WINDOW requests are queued, running or answered but unsent."""
        while len(self.queued) + len(self.answers) >= STREAM_WINDOW or self.unsent >= STREAM_WINDOW_BYTES:
            self.roomy = asyncio.get_running_loop().create_future()
            await self.roomy


class InferenceService:
    """The v2 RPCs. `handler()` registers them with a grpc.aio server."""

    def __init__(self, backend: Backend, restricted: tuple[RestrictedProtocol, ...] = ()) -> None:
        self.core, self.info, self.control, self.auth = backend.core, backend.info, backend.control, backend.auth
        self.limits, self.offload = backend.limits, backend.offload
        self.restricted = {method: rule for rule in restricted for method in rule.methods}

    def implementations(self) -> dict:
        """The RPCs served, by name; the service's others answer UNIMPLEMENTED."""
        return {
            "ServerLive": self.ServerLive, "ServerReady": self.ServerReady, "ModelReady": self.ModelReady,
            "ServerMetadata": self.ServerMetadata, "ModelMetadata": self.ModelMetadata, "ModelConfig": self.ModelConfig,
            "ModelInfer": self.ModelInfer, "ModelStreamInfer": self.ModelStreamInfer, "ModelStatistics": self.ModelStatistics,
            "RepositoryIndex": self.RepositoryIndex, "RepositoryModelLoad": self.RepositoryModelLoad,
            "RepositoryModelUnload": self.RepositoryModelUnload,
        }  # fmt: skip

    def handler(self) -> grpc.GenericRpcHandler:
        handlers, served = {}, self.implementations()
        for method in protocol.SERVICE.methods:
            implementation = served.get(method.name)
            if implementation is not None and method.name in self.restricted:
                implementation = restricted(implementation, self.restricted[method.name], method.server_streaming)
            if implementation is not None and method.name not in WITHOUT_KEY and self.auth.keys is not None:
                implementation = self._authenticated(implementation)
            deserialize = protocol.request_class(method.name).FromString
            serialize = protocol.response_class(method.name).SerializeToString
            if method.name in PROTOCOL_GROUPS["inference"]:  # bytes both ways: parsed and built in grpc_codec
                deserialize, serialize = None, serialize_response
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
        auth = self.auth
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
        return protocol.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return protocol.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        model = self.info.model(request.name, request.version)
        response = protocol.ModelMetadataResponse(name=model.name, versions=self.info.ready_versions(model.name), platform=PLATFORM)
        for spec in model.signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    async def ModelConfig(self, request, context):
        return protocol.ModelConfigResponse(config=self.info.config(request.name, request.version))

    # --- inference ----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        return await self.infer(request, self.identity(context))

    async def ModelStreamInfer(self, requests, context):
        """Triton's stream: requests run concurrently (so they batch), and each is answered on
        the stream as it completes; a failure is that answer's error_message, not the stream's.
        A caller whose key leaves the keys file is the exception: the stream ends UNAUTHENTICATED."""
        stream, reader = _Stream(), None
        try:
            identity = self.identity(context)
            reader = asyncio.create_task(self._answer_each(requests, stream, context, identity))
            while (answer := await stream.get()) is not None:
                yield answer
            await reader  # raises what broke the reading, if anything did
        except Unauthenticated as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        finally:
            if reader is not None:
                reader.cancel()  # the client went away: its requests still queued are dropped

    async def _answer_each(self, requests, stream: "_Stream", context, identity: Identity) -> None:
        """Queue each request as it arrives, without a task of its own: a callback answers it when
        its batch is done. Returns once every request read is answered; raises Unauthenticated
        after that when the caller's key was revoked meanwhile."""
        try:
            refused = await self._read_each(requests, stream, context, identity)
            if stream.queued:
                stream.idle = asyncio.get_running_loop().create_future()
                await stream.idle
        finally:
            for item, (call, _) in list(stream.queued.items()):
                call.model.batcher.cancel(item)
            stream.put(None)
        if refused is not None:
            raise refused

    async def _read_each(self, requests, stream: "_Stream", context, identity: Identity) -> Unauthenticated | None:
        """Queue the stream's requests; stop at the first one whose caller the current keys refuse.

        A stream lives for hours, and its metadata was checked as it opened: each message is checked
        again once the keys file has been re-read (Authenticator.follow swaps in a new KeyFile), so
        a revoked key stops at its next message, which is neither run nor billed. The requests
        accepted before it were authorised when they arrived, and are answered."""
        keys = self.auth.keys
        async for request in requests:
            if self.auth.keys is not keys:
                keys = self.auth.keys
                try:
                    identity = self.identity(context)  # the tenant too may have changed
                except Unauthenticated as err:
                    return err
            await self._stream_one(request, self.core.start(GRPC, identity), stream)
            await stream.room()
        return None

    async def _stream_one(self, request: bytes, call: Call, stream: "_Stream") -> None:
        """Decode and queue one of the stream's requests (a big one in a codec thread, while the
        stream's next message waits: a stream's requests are read one after another anyway)."""
        head = None
        try:
            message, raw, head = await self._parsed(request, call)
            item = self.core.enqueue(call, await self._decoded(message, raw, head, call), head.parameters)
        except asyncio.CancelledError as err:  # the stream went away while its request was being decoded
            self.core.end(call, err)
            raise
        except Exception as err:  # one bad request must not end the stream, nor its neighbours
            self._stream_error(head, call, stream, err)
            return
        stream.queued[item] = (call, None)
        item.future.add_done_callback(lambda done: self._stream_done(head, call, stream, item, done))

    def _stream_done(self, head: RequestHead, call: Call, stream: "_Stream", item, done: asyncio.Future) -> None:
        if done.cancelled():  # the stream went away; nobody is left to answer
            self.core.end(call, asyncio.CancelledError())
        elif (error := done.exception()) is not None:
            self._stream_error(head, call, stream, error)
        else:
            try:
                call.answer = done.result()
                outputs, said = self._outputs(call, call.answer)
                if response_weight(outputs) > OFFLOAD_BYTES:  # encoded in a codec thread; stays queued till then
                    encoding = asyncio.ensure_future(self._stream_encoded(head, call, stream, item, outputs, said))
                    stream.queued[item] = (call, encoding)
                    return
                answer = response_bytes(call.model, head.id, outputs, said, stream=True)
            except Exception as err:
                self._stream_error(head, call, stream, err)
            else:
                stream.put(answer)
                self.core.end(call)
        self._stream_settled(stream, item)

    async def _stream_encoded(self, head: RequestHead, call: Call, stream: "_Stream", item, outputs, said) -> None:
        try:
            answer = await self.offload.in_thread(response_bytes, call.model, head.id, outputs, said, True)  # weighed already
        except Exception as err:
            self._stream_error(head, call, stream, err)
        else:
            stream.put(answer)
            self.core.end(call)
        finally:
            self._stream_settled(stream, item)

    @staticmethod
    def _stream_settled(stream: "_Stream", item) -> None:
        stream.queued.pop(item, None)
        if not stream.queued and stream.idle is not None and not stream.idle.done():
            stream.idle.set_result(None)

    def _stream_error(self, head: RequestHead | None, call: Call, stream: "_Stream", error: Exception) -> None:
        """Answer a refused or failed request with its error message; the stream goes on. A failure
        that is no ServingError is a bug: the log has it, the caller a message without its details."""
        message = str(error)
        if not isinstance(error, ServingError):
            log.error("ModelStreamInfer failed", exc_info=error)
            message = "ModelStreamInfer: internal error; the server log has details"
        echo = protocol.ModelInferResponse()
        if head is not None:  # else the message did not parse, or broke a bound: nothing of it is echoed
            echo.model_name, echo.model_version, echo.id = head.model_name, head.model_version, head.id
        stream.put(protocol.ModelStreamInferResponse(error_message=message, infer_response=echo))
        self.core.end(call, error)

    async def infer(self, request: bytes, identity: Identity) -> bytes:
        """One serialized ModelInferRequest to its serialized response; raises ServingError for the
        caller to report."""
        with self.core.request(GRPC, identity) as call:
            head, decoded = await self._read(request, call)
            answer = await self.core.infer(call, decoded, head.parameters)
            outputs, said = self._outputs(call, answer)
            return await self.offload.run(response_weight(outputs), response_bytes, call.model, head.id, outputs, said)

    async def _read(self, data: bytes, call: Call) -> tuple[RequestHead, DecodedRequest]:
        """Parsed and decoded; the message itself (and its typed contents) is gone on return."""
        message, raw, head = await self._parsed(data, call)
        return head, await self._decoded(message, raw, head, call)

    async def _parsed(self, data: bytes, call: Call):
        """(message, raw contents, checked RequestHead): parsed on the loop where that is cheap (a
        small message, or a big one of raw numbers), else in a codec thread."""
        parsed = parse_on_loop(data)
        if parsed is None:
            limits = self.limits
            parsed = await self.offload.in_thread(parse_request, data, limits.max_bytes_elements, limits.max_typed_elements)
        message, raw = parsed
        head = request_head(message, len(data), self.limits)
        call.request_id = head.id
        return message, raw, head

    async def _decoded(self, message, raw: list | None, head: RequestHead, call: Call) -> DecodedRequest:
        model = self.core.resolve(call, head.model_name, head.model_version)
        weight = decode_weight(message, raw, head.size)
        return await self.offload.run(weight, decode_request, message, model.signature, self.limits, raw)

    def _outputs(self, call: Call, answer: Answer):
        """The (spec, array) of each output asked for, and the accounting parameters; on the loop."""
        signature = call.model.signature
        return [(signature.output(name), answer.outputs[name]) for name in call.outputs], self.core.accounting(call, answer)

    # --- statistics ---------------------------------------------------------------------------

    async def ModelStatistics(self, request, context):
        """Triton's counts and durations, plus what each version cost (an onnxserve field)."""
        return self.info.statistics(request.name, request.version)

    # --- model repository ---------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        response = protocol.RepositoryIndexResponse()
        for row in self.control.index(request.ready):
            response.models.add(**row)
        return response

    async def RepositoryModelLoad(self, request, context):
        parameters = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in request.parameters.items()}
        await self.control.load(request.model_name, parameters)
        return protocol.response_class("RepositoryModelLoad")()

    async def RepositoryModelUnload(self, request, context):
        await self.control.unload(request.model_name)
        return protocol.response_class("RepositoryModelUnload")()


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
