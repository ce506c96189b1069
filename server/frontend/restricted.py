"""API groups restricted to callers that send a header (--grpc-restricted-protocol,
--http-restricted-api), as Triton restricts them: the check both transports make."""

import hmac

from server.config import RestrictedProtocol
from server.errors import PermissionDenied


def permitted(rule: RestrictedProtocol, given: str | None) -> None:
    """Raise PermissionDenied unless `given`, the caller's value of the rule's header, is the rule's."""
    if given is None or not hmac.compare_digest(str(given).encode(), rule.value.encode()):
        raise PermissionDenied(
            f"this API is restricted ({', '.join(rule.groups)}): send the header '{rule.header}' "
            "with the value the server was started with"
        )
