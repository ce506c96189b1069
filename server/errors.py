"""Domain errors. service.py maps each to one gRPC status code; nothing else
inside the server knows about gRPC."""


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


class ExecutionFailed(Exception):
    """onnxruntime failed on a batch. Not a ServingError: its text stays in the log."""


class ConfigError(Exception):
    """A settings or model configuration problem; the message names the file and field."""
