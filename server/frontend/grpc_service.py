"""The gRPC transport: inference.GRPCInferenceService's RPCs over the transport-neutral core
(server/engine/inference.py) and the rest of the Backend, and the one table from domain errors to
gRPC status codes. grpc_server.py builds and starts the server around it."""

import logging

import grpc

from server import errors, protocol
from server.config import PROTOCOL_GROUPS, RestrictedProtocol
from server.engine.batching import Answer
from server.engine.inference import GRPC, Call, Identity
from server.errors import ServingError
from server.frontend.backend import Backend
from server.frontend.grpc_codec import (
    RequestHead,
    decode_weight,
    parse_on_loop,
    parse_request,
    request_head,
    response_bytes,
    response_weight,
    serialize_response,
)
from server.frontend.grpc_stream import StreamInfer
from server.frontend.identity import AUTHORIZATION, TENANT_HEADER
from server.frontend.model_info import EXTENSIONS, PLATFORM, SERVER_NAME, server_version
from server.frontend.restricted import restricted
from server.frontend.tensor_codec import decode_request
from server.frontend.tls import grpc_client_name
from server.tensors import DecodedRequest

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
# ModelReady is not open: it would tell anyone which model names exist (probes use ServerReady).
WITHOUT_KEY = ("ServerLive", "ServerReady", *PROTOCOL_GROUPS["inference"])


class InferenceService:
    """The v2 RPCs. `handler()` registers them with a grpc.aio server."""

    def __init__(self, backend: Backend, restricted: tuple[RestrictedProtocol, ...] = ()) -> None:
        self.core, self.info, self.control, self.auth = backend.core, backend.info, backend.control, backend.auth
        self.limits, self.offload = backend.limits, backend.offload
        self.restricted = {method: rule for rule in restricted for method in rule.methods}

    def implementations(self) -> dict:
        """The RPCs served, by name; the service's others answer UNIMPLEMENTED."""
        return {
            "ServerLive": self.ServerLive,
            "ServerReady": self.ServerReady,
            "ModelReady": self.ModelReady,
            "ServerMetadata": self.ServerMetadata,
            "ModelMetadata": self.ModelMetadata,
            "ModelConfig": self.ModelConfig,
            "ModelInfer": self.ModelInfer,
            "ModelStreamInfer": StreamInfer(self).serve,
            "ModelStatistics": self.ModelStatistics,
            "RepositoryIndex": self.RepositoryIndex,
            "RepositoryModelLoad": self.RepositoryModelLoad,
            "RepositoryModelUnload": self.RepositoryModelUnload,
        }

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
        response = protocol.ModelMetadataResponse(
            name=model.name, versions=self.info.ready_versions(model.name), platform=PLATFORM
        )
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

    async def infer(self, request: bytes, identity: Identity) -> bytes:
        """One serialized ModelInferRequest to its serialized response; raises ServingError for the
        caller to report."""
        with self.core.request(GRPC, identity) as call:
            head, decoded = await self._read(request, call)
            answer = await self.core.infer(call, decoded, head.parameters)
            outputs, said = self.outputs(call, answer)
            return await self.offload.run(response_weight(outputs), response_bytes, call.model, head.id, outputs, said)

    async def _read(self, data: bytes, call: Call) -> tuple[RequestHead, DecodedRequest]:
        """Parsed and decoded; the message itself (and its typed contents) is gone on return."""
        message, raw, head = await self.parsed(data, call)
        return head, await self.decoded(message, raw, head, call)

    async def parsed(self, data: bytes, call: Call):
        """(message, raw contents, checked RequestHead): parsed on the loop where that is cheap (a
        small message, or a big one of raw numbers), else in a codec thread."""
        parsed = parse_on_loop(data)
        if parsed is None:
            limits = self.limits
            parsed = await self.offload.in_thread(
                parse_request, data, limits.max_bytes_elements, limits.max_typed_elements
            )
        message, raw = parsed
        head = request_head(message, len(data), self.limits)
        call.request_id = head.id
        return message, raw, head

    async def decoded(self, message, raw: list | None, head: RequestHead, call: Call) -> DecodedRequest:
        model = self.core.resolve(call, head.model_name, head.model_version)
        weight = decode_weight(message, raw, head.size)
        return await self.offload.run(weight, decode_request, message, model.signature, self.limits, raw)

    def outputs(self, call: Call, answer: Answer):
        """The (spec, array) of each output asked for, and the accounting parameters; on the loop."""
        signature = call.model.signature
        return [(signature.output(name), answer.outputs[name]) for name in call.outputs], self.core.accounting(
            call, answer
        )

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
        parameters = {
            key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in request.parameters.items()
        }
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
