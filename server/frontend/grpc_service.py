"""The gRPC transport: inference.GRPCInferenceService's RPCs over the Backend (inference in
grpc_infer.py and grpc_stream.py, the rest here), API groups restricted to callers that send a
header, and the one table from domain errors to gRPC status codes. grpc_server.py builds and
starts the server around it."""

import logging

import grpc

from server import errors, protocol
from server.config import PROTOCOL_GROUPS, RestrictedProtocol
from server.errors import PermissionDenied, ServingError
from server.frontend.backend import Backend
from server.frontend.grpc_codec import (
    serialize_response,
)
from server.frontend.grpc_infer import GrpcInference
from server.frontend.grpc_shared_memory import SharedMemoryRpcs
from server.frontend.grpc_stream import StreamInfer
from server.frontend.restricted import permitted
from server.frontend.server_info import PLATFORM, extensions, server_version

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
    errors.TenantRefused: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Open to every caller, so that probes need no key; the inference RPCs identify their caller themselves.
# ModelReady is not open: it would tell anyone which model names exist (probes use ServerReady).
WITHOUT_KEY = ("ServerLive", "ServerReady", *PROTOCOL_GROUPS["inference"])


class InferenceService:
    """The v2 RPCs. `handler()` registers them with a grpc.aio server."""

    def __init__(self, backend: Backend, restricted: tuple[RestrictedProtocol, ...] = ()) -> None:
        self.core, self.info, self.control, self.auth = backend.core, backend.info, backend.control, backend.auth
        self.traces, self.name = backend.traces, backend.name
        self.inference = GrpcInference(
            backend.core, backend.auth, backend.limits, backend.offload, backend.regions, backend.traces.exporting
        )
        self.shared_memory = SharedMemoryRpcs(backend.regions, self.inference) if backend.regions is not None else None
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
            "ModelStreamInfer": StreamInfer(self.inference).serve,
            "ModelStatistics": self.ModelStatistics,
            "RepositoryIndex": self.RepositoryIndex,
            "RepositoryModelLoad": self.RepositoryModelLoad,
            "RepositoryModelUnload": self.RepositoryModelUnload,
            "TraceSetting": self.TraceSetting,
            **(self.shared_memory.implementations() if self.shared_memory is not None else {}),
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

    def _authenticated(self, implementation):
        async def call(request, context):
            self.inference.identity(context)
            return await implementation(request, context)

        return call

    # --- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request, context):
        return protocol.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return protocol.ServerReadyResponse(ready=self.core.ready())

    async def ModelReady(self, request, context):
        return protocol.ModelReadyResponse(ready=await self.core.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        said = extensions(self.shared_memory is not None)
        return protocol.ServerMetadataResponse(name=self.name, version=server_version(), extensions=said)

    async def ModelMetadata(self, request, context):
        model = await self.info.model(request.name, request.version)
        response = protocol.ModelMetadataResponse(
            name=model.name, versions=await self.info.ready_versions(model.name), platform=PLATFORM
        )
        for spec in model.signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    async def ModelConfig(self, request, context):
        return protocol.ModelConfigResponse(config=await self.info.config(request.name, request.version))

    # --- inference ----------------------------------------------------------------------------

    async def TraceSetting(self, request, context):
        """Triton's trace settings, the server's or a model's: read, or changed where the request says."""
        given = {key: list(value.value) for key, value in request.settings.items()}
        traces, model = self.traces, request.model_name
        settings = await (traces.update(model, given) if given else traces.view(model))
        response = protocol.response_class("TraceSetting")()
        for key, values in settings.items():
            response.settings[key].value.extend(values)
        return response

    async def ModelInfer(self, request, context):
        identity = self.inference.identity(context)
        return await self.inference.infer(request, identity, self.inference.trace_parent(context))

    # --- statistics ---------------------------------------------------------------------------

    async def ModelStatistics(self, request, context):
        """Triton's counts and durations, plus what each version cost (an onnxserve field)."""
        return await self.info.statistics(request.name, request.version)

    # --- model repository ---------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        response = protocol.RepositoryIndexResponse()
        for row in await self.control.index(request.ready):
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


def restricted(implementation, rule: RestrictedProtocol, streaming: bool):
    """The RPC, refused with PERMISSION_DENIED unless the call carries the rule's metadata."""

    def check(context) -> None:
        permitted(rule, next((value for key, value in context.invocation_metadata() if key == rule.header), None))

    if streaming:

        async def stream(requests, context):
            try:
                check(context)
            except PermissionDenied as err:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            async for answer in implementation(requests, context):
                yield answer

        return stream

    async def call(request, context):
        check(context)
        return await implementation(request, context)

    return call


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
