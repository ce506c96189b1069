"""The server onnxserve-tune measures: one it starts itself (`python -m server` in explicit model
control mode on loopback ports the system chooses, REST off), or one already running on
loopback; and the calls that apply a configuration to it (RepositoryModelLoad with `config`)."""

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from server import protocol
from server.tools import launcher
from server.tools.launcher import Launched

# The user's ONNXSERVE_* settings that still apply to the server the tool starts; the others
# (TLS, API keys, ports, control mode...) would change what the tool connects to, or how.
KEPT_ENVIRONMENT = (
    "ONNXSERVE_DEVICE_PRICE",
    "ONNXSERVE_TENSORRT_CACHE_DIR",
    "ONNXSERVE_REQUIRE_GPU",
    "ONNXSERVE_DEFAULT_MAX_BATCH_SIZE",
)


class ServerError(RuntimeError):
    """The server could not be started, or refused what the tool needs of it."""


class LoadRefused(RuntimeError):
    """The server did not load a configuration (its message says why)."""


def loopback_address(text: str, flag: str) -> str:
    """HOST:PORT on this machine, or ServerError naming the flag: tuning load goes nowhere else."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ServerError(f"{flag}: {text!r} is not HOST:PORT")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name could resolve anywhere: only 'localhost' is taken on trust
        if not loopback:
            raise ServerError(
                f"{flag}: {host} is not a loopback address; onnxserve-tune sends load only to a server on this "
                "machine (127.0.0.1, ::1 or localhost), or starts its own"
            )
    return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


def launch(repository: Path, model: str, device_prices: Sequence[str], timeout: float = 300) -> Launched:
    """Start onnxserve serving only `model`, and wait until it is ready (ServerError if not)."""
    arguments = [
        "--model-repository",
        str(repository.resolve()),
        "--model-control-mode",
        "explicit",
        "--load-model",
        model,
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--http-port",
        "-1",
        *(argument for price in device_prices for argument in ("--device-price", price)),
    ]
    try:
        launched = launcher.launch(arguments, timeout=timeout, env=_environment())
    except launcher.StartFailed as err:
        raise ServerError(str(err)) from None
    if not launched.ready:
        stop(launched, 10)
        raise ServerError(f"onnxserve could not load model '{model}'; its log ends:\n{launched.log_text(last=30)}")
    return launched


def stop(launched: Launched, timeout: float = 30) -> int:
    """SIGTERM; SIGKILL if it outlives `timeout`."""
    try:
        return launched.stop(timeout)
    except subprocess.TimeoutExpired:
        launched.process.kill()
        return launched.wait(10)


def metrics_url(launched: Launched) -> str:
    return f"http://127.0.0.1:{launched.metrics_port}/metrics"


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXSERVE_") or k in KEPT_ENVIRONMENT}
    package_parent = str(Path(__file__).resolve().parent.parent)  # `-m server` finds this package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


# --- calls ------------------------------------------------------------------------------------


async def load(channel: grpc.aio.Channel, model: str, config_json: str | None, timeout: float = 900) -> None:
    """RepositoryModelLoad, with a JSON ModelConfig replacing config.pbtxt for this load (None:
    the repository's own files). LoadRefused carries the server's reason."""
    request = protocol.request_class("RepositoryModelLoad")(model_name=model)
    if config_json is not None:
        request.parameters["config"].string_param = config_json
    try:
        await protocol.unary(channel, "RepositoryModelLoad")(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise LoadRefused(err.details()) from None
        if err.code() in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        ):
            raise ServerError(f"the server refused to load '{model}' ({err.code().name}): {err.details()}") from None
        raise ServerError(f"RepositoryModelLoad of '{model}' failed ({err.code().name}): {err.details()}") from None


async def served_config(channel: grpc.aio.Channel, model: str) -> dict:
    """The configuration in force, as the server reports it (completed from the graph, with the
    values calibration chose in `parameters`)."""
    response = await protocol.unary(channel, "ModelConfig")(
        protocol.request_class("ModelConfig")(name=model), timeout=30
    )
    return json_format.MessageToDict(response.config, preserving_proto_field_name=True)


def threads_in_force(config: dict) -> int:
    value = config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value", "1")
    return int(value) if value.isdigit() else 1


def instances_in_force(config: dict) -> int:
    groups = config.get("instance_group") or [{}]
    return int(groups[0].get("count", 1))
