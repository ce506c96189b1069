"""gRPC inference, one request at a time: who is calling, then parse, decode, queue, encode, each
step on the loop where it is cheap and in a codec thread where the request is big. ModelInfer is
one call of `infer`; ModelStreamInfer (grpc_stream.py) runs the same steps for each message."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.call import GRPC, Call, Identity
from server.engine.queued import Answer
from server.frontend.grpc_codec import (
    RequestHead,
    decode_weight,
    parse_on_loop,
    parse_request,
    request_head,
    response_bytes,
    response_weight,
)
from server.frontend.identity import AUTHORIZATION, TENANT_HEADER, Authenticator
from server.frontend.request_limits import Offload, RequestLimits
from server.frontend.shared_regions import (
    PlacedOutput,
    SharedRegions,
    inputs_from_regions,
    names_regions,
    region_of,
    with_regions,
    write_output,
)
from server.frontend.tensor_codec import decode_request, output_bytes
from server.frontend.tls import grpc_client_name
from server.tensors import DecodedRequest

if TYPE_CHECKING:  # named, not imported: see backend.py
    from server.engine.inference import InferenceCore


TRACE_PARENT, TRACE_STATE = "traceparent", "tracestate"  # W3C Trace Context, as gRPC metadata


def metadata_pair(context, first: str, second: str) -> tuple[str | None, str | None]:
    """Two keys' values from the call's metadata, in one pass (the last of each where repeated)."""
    one = two = None
    for key, value in context.invocation_metadata():
        if key == first:
            one = value
        elif key == second:
            two = value
    return one, two


class GrpcInference:
    def __init__(
        self,
        core: InferenceCore,
        auth: Authenticator,
        limits: RequestLimits,
        offload: Offload,
        regions: SharedRegions | None = None,
        traced: bool = False,
    ) -> None:
        self.core, self.auth, self.limits, self.offload, self.regions = core, auth, limits, offload, regions
        self.traced = traced  # traces are exported: read the callers' traceparent

    def identity(self, context) -> Identity:
        """Who is calling, from the call's metadata and client certificate; Unauthenticated when
        keys are required and it has no valid one."""
        auth = self.auth
        if not auth.reads_calls:  # nothing configured to read: skip the metadata
            return auth.anonymous
        authorization, header = metadata_pair(context, AUTHORIZATION, TENANT_HEADER)
        certificate = grpc_client_name(context) if auth.mutual_tls else None
        return auth.identify(authorization, certificate, header)

    def trace_parent(self, context) -> tuple[str, str] | None:
        """The caller's W3C traceparent and tracestate, where traces are exported (else not looked for)."""
        if not self.traced:
            return None
        parent, state = metadata_pair(context, TRACE_PARENT, TRACE_STATE)
        return (parent, state or "") if parent else None

    async def infer(self, request: bytes, identity: Identity, trace_parent: tuple | None = None) -> bytes:
        """One serialized ModelInferRequest to its serialized response; raises ServingError for the
        caller to report."""
        with self.core.request(GRPC, identity) as call:
            call.trace_parent = trace_parent
            head, decoded, placed = await self._read(request, call)
            answer = await self.core.infer(call, decoded, head.parameters)
            outputs, said = self.outputs(call, answer)
            return await self.offload.run(response_weight(outputs), self.respond, call, head.id, outputs, said, placed)

    def respond(self, call: Call, request_id: str, outputs: list, said, placed: dict, stream: bool = False) -> bytes:
        """The serialized response, the outputs asked for in shared memory written there first: both
        in a codec thread where the outputs are big (a region outlives the views a write holds)."""
        if placed:
            outputs = self.placed_outputs(outputs, placed, call)
        return response_bytes(call.model, request_id, outputs, said, stream)

    async def _read(self, data: bytes, call: Call) -> tuple[RequestHead, DecodedRequest, dict]:
        """Parsed and decoded, and the outputs asked for in shared memory; the message itself (and
        its typed contents) is gone on return."""
        message, raw, head = await self.parsed(data, call)
        decoded = await self.decoded(message, raw, head, call)
        return head, decoded, await self.placements(message, call) if names_regions(message.outputs) else {}

    def placed_outputs(self, outputs: list, placed: dict, call: Call) -> list:
        """The outputs asked for in shared memory written there, and named last in the response
        (whose raw contents stand for the outputs before them)."""
        kept = [(spec, array) for spec, array in outputs if spec.name not in placed]
        return kept + [
            (spec, self._place(placed[spec.name], spec, array, call)) for spec, array in outputs if spec.name in placed
        ]

    async def placements(self, message, call: Call) -> dict:
        """Output name -> (region, offset, size), for the outputs asked for in shared memory."""
        if self.regions is None:
            return {}
        if not self.regions.remote:
            return self._placements(message, call)
        return await with_regions(self.regions, call.identity.tenant, self._placements, message, call)

    def _placements(self, message, call: Call) -> dict:
        placed = {}
        for output in message.outputs:
            where = region_of(output.parameters, f"{call.model.signature.label}: output '{output.name}'")
            if where is not None:
                name, offset, size = where
                placed[output.name] = (self.regions.get(name, call.identity.tenant), offset, size)
        return placed

    def _place(self, where, spec, array, call: Call) -> PlacedOutput:
        """The output's bytes as the wire has them (BYTES length-prefixed) into its region."""
        region, offset, size = where
        data = output_bytes(spec.datatype, array)
        write_output(region, offset, size, data, f"{call.model.signature.label}: output '{spec.name}'")
        return PlacedOutput(array.shape, region.name, offset, size)

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
        model = await self.core.resolve(call, head.model_name, head.model_version)
        if self.regions is not None and names_regions(message.inputs):  # named but not registered: refused
            tenant = call.identity.tenant
            raw = await with_regions(
                self.regions, tenant, inputs_from_regions, message, raw, self.regions, tenant, model.signature.label
            )
        weight = decode_weight(message, raw, head.size)
        return await self.offload.run(weight, decode_request, message, model.signature, self.limits, raw)

    def outputs(self, call: Call, answer: Answer):
        """The (spec, array) of each output asked for, and the accounting parameters; on the loop."""
        signature = call.model.signature
        return [(signature.output(name), answer.outputs[name]) for name in call.outputs], self.core.accounting(
            call, answer
        )
