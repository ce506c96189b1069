"""Domain errors, raised inside the server and mapped once at its edge: to a gRPC status code by
server/frontend/grpc_service.py's STATUS table, to an HTTP status by server/frontend/http_service.py's.
Nothing else inside the server knows about either. Messages name the model, the tensor, what was
expected and what arrived; `shown` cuts what a caller sent short before a message quotes it."""

SHOWN_CHARACTERS = 64  # of a caller's name or value quoted back in an error message


def shown(value) -> str:
    """A caller's string (a name, a datatype) for an error message, cut short if long."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


class ServingError(Exception):
    """Base of every error a caller may see; the message is safe to show."""


class ModelNotFound(ServingError):
    """Unknown model, or unknown version of a known model."""


class ModelNotReady(ServingError):
    """The model exists but is not serving (loading, failed, unloading)."""


class InvalidInput(ServingError):
    """The request does not fit the model: names, datatypes, shapes, sizes, encoding."""


class Overloaded(ServingError):
    """The model's queue is full; the request was refused without waiting."""


class DeadlineExceeded(ServingError):
    """The request's timeout expired while it waited in the queue; it never ran."""


class ShuttingDown(ServingError):
    """The server is draining and accepts no new work."""


class LoadFailed(ServingError):
    """A RepositoryModelLoad could not load the model (its text says "failed to load", which
    Triton's clients match on); whatever served before keeps serving."""


class ControlDisabled(ServingError):
    """A repository load or unload while --model-control-mode does not allow one."""


class PermissionDenied(ServingError):
    """A restricted RPC without the metadata its --grpc-restricted-protocol names."""


class Unauthenticated(ServingError):
    """A call without a valid API key while --api-keys is set."""


class TenantRefused(ServingError):
    """The caller's tenant is over one of its limits (--tenant-limits); it may retry after `retry_after` s."""

    def __init__(self, message: str, reason: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class ExecutionFailed(Exception):
    """onnxruntime failed on a batch. Not a ServingError: its text stays in the log."""


class ConfigError(Exception):
    """A settings or model configuration problem; the message names the file and field."""
