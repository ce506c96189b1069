"""API groups restricted to callers that send a header (--grpc-restricted-protocol,
--http-restricted-api), as Triton restricts them."""

import hmac

import grpc

from server.config import RestrictedProtocol
from server.errors import PermissionDenied


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


def permitted(rule: RestrictedProtocol, given: str | None) -> None:
    """Raise PermissionDenied unless `given`, the caller's value of the rule's header, is the rule's."""
    if given is None or not hmac.compare_digest(str(given).encode(), rule.value.encode()):
        raise PermissionDenied(
            f"this API is restricted ({', '.join(rule.groups)}): send the header '{rule.header}' "
            "with the value the server was started with"
        )
