"""The HTTP transport: the KServe v2 REST API and Triton's extensions (model config,
statistics, repository index/load/unload, binary tensor data) over the Backend that gRPC uses
too, as a minimal ASGI app served by uvicorn with httptools in the server's own event loop
(start_http); and the one table from domain errors to HTTP status codes."""

import base64
import binascii
import logging
import math
from dataclasses import dataclass

import orjson
import uvicorn

from server import errors
from server.config import RestrictedProtocol, ServerSettings
from server.engine.call import HTTP, Identity
from server.errors import InvalidInput, ServingError, TenantRefused, Unauthenticated
from server.frontend.backend import Backend
from server.frontend.connection_limits import ConnectionMetrics, Listener, http_limits, listen
from server.frontend.http_codec import (
    HEADER_LENGTH,
    JSON_TYPE,
    decode_infer,
    encode_infer,
    json_body,
    output_regions,
    split_body,
)
from server.frontend.http_shared_memory import shared_memory
from server.frontend.http_tls import uvicorn_tls
from server.frontend.identity import AUTHORIZATION, TENANT_HEADER
from server.frontend.request_limits import OFFLOAD_BYTES, RequestLimits, encode_weight, raw_bytes_weight
from server.frontend.restricted import permitted
from server.frontend.server_info import PLATFORM, extensions, proto_json, server_version
from server.frontend.shared_regions import PlacedOutput, TenantRegions, with_regions, write_output
from server.frontend.tensor_codec import output_bytes
from server.frontend.tls import http_client_name
from server.observe.trace_settings import given_settings, rest_settings

log = logging.getLogger(__name__)

STATUS = {  # Triton's mapping (PROTOCOL.md 2e), plus 403 and 504
    errors.ModelNotFound: 404,
    errors.InvalidInput: 400,
    errors.LoadFailed: 400,
    errors.ControlDisabled: 400,
    errors.ModelNotReady: 503,
    errors.ShuttingDown: 503,
    errors.Overloaded: 503,
    errors.DeadlineExceeded: 504,
    errors.PermissionDenied: 403,
    errors.Unauthenticated: 401,
    errors.TenantRefused: 429,
}
CHALLENGE = ((b"www-authenticate", b'Bearer realm="onnxserve"'),)
AUTHORIZATION_KEY, TENANT_KEY = AUTHORIZATION.encode(), TENANT_HEADER.encode()
BODY_TYPES = (
    "application/json",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "",
)  # the last two: curl -d, and none
HEADER_LENGTH_KEY = HEADER_LENGTH.encode()
# Route action -> (HTTP method, API group for --http-restricted-api)
ACTIONS = {
    "live": (("GET",), "health"),
    "ready": (("GET",), "health"),
    "server": (("GET",), "metadata"),
    "metadata": (("GET",), "metadata"),
    "model_ready": (("GET",), "health"),
    "config": (("GET",), "model-config"),
    "stats": (("GET",), "statistics"),
    "infer": (("POST",), "inference"),
    "index": (("POST",), "model-repository"),
    "load": (("POST",), "model-repository"),
    "unload": (("POST",), "model-repository"),
    "shm_status": (("GET",), "shared-memory"),
    "shm_register": (("POST",), "shared-memory"),
    "shm_unregister": (("POST",), "shared-memory"),
    "trace": (("GET", "POST"), "trace"),  # read, or change with a body
}
SHARED_MEMORY_KINDS = ("systemsharedmemory", "cudasharedmemory")
# Open to every caller, so that probes need no key. Not a model's readiness: it would tell anyone
# which model names exist (Kubernetes probes use /v2/health/ready).
WITHOUT_KEY = ("live", "ready")


class HttpError(Exception):
    """A request the API cannot route or read: an unknown path, a wrong method, a bad body."""

    def __init__(self, status: int, message: str, headers: tuple = ()) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


@dataclass(frozen=True, slots=True)
class Route:
    action: str
    model: str = ""
    version: str = ""


def route(path: str) -> Route:
    """The action and model a path names; HttpError 404 for any other path."""
    parts = path.strip("/").split("/")
    if parts[:1] != ["v2"]:
        raise HttpError(404, f"no such path: {path}; the API is under /v2")
    rest = parts[1:]
    if not rest:
        return Route("server")
    if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        return Route(rest[1])
    if rest == ["repository", "index"]:
        return Route("index")
    if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[3] in ("load", "unload"):
        return Route(rest[3], rest[2])
    if rest == ["models", "stats"]:
        return Route("stats")
    if rest == ["trace", "setting"]:
        return Route("trace")
    if rest[0] in SHARED_MEMORY_KINDS:  # Route's model is the region's name, its version the kind
        return _shared_memory_route(rest, path)
    if rest[0] == "models" and len(rest) >= 2:
        model, tail, version = rest[1], rest[2:], ""
        if tail[:1] == ["versions"] and len(tail) >= 2:
            version, tail = tail[1], tail[2:]
        if not tail:
            return Route("metadata", model, version)
        if len(tail) == 1 and tail[0] in ("ready", "config", "stats", "infer"):
            return Route("model_ready" if tail[0] == "ready" else tail[0], model, version)
        if tail == ["trace", "setting"] and not version:
            return Route("trace", model)
    raise HttpError(404, f"no such path: {path}")


def _shared_memory_route(rest: list[str], path: str) -> Route:
    kind, tail = rest[0], rest[1:]
    if tail in (["status"], ["unregister"]):
        return Route(f"shm_{tail[0]}", "", kind)
    if len(tail) == 3 and tail[0] == "region" and tail[2] in ("status", "register", "unregister"):
        return Route(f"shm_{tail[2]}", tail[1], kind)
    raise HttpError(404, f"no such path: {path}")


class HttpApi:
    """The ASGI application."""

    def __init__(self, backend: Backend, restricted: tuple[RestrictedProtocol, ...], max_body_bytes: int) -> None:
        self.core, self.info, self.control, self.auth = backend.core, backend.info, backend.control, backend.auth
        self.limits, self.offload, self.regions = backend.limits, backend.offload, backend.regions
        self.traces, self.traced, self.name = backend.traces, backend.traces.exporting, backend.name
        self.restricted = {group: rule for rule in restricted for group in rule.groups}
        self.max_body_bytes = max_body_bytes
        self.handlers = {
            "live": self._live,
            "ready": self._ready,
            "server": self._server,
            "metadata": self._metadata,
            "model_ready": self._model_ready,
            "config": self._config,
            "stats": self._stats,
            "index": self._index,
            "load": self._load,
            "unload": self._unload,
            "trace": self._trace,
        }

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        headers = dict(scope["headers"])
        try:
            found = route(scope["path"])
            methods, group = ACTIONS[found.action]
            if scope["method"] not in methods:
                raise HttpError(
                    405,
                    f"{scope['method']} is not allowed on {scope['path']}; use {' or '.join(methods)}",
                    ((b"allow", ", ".join(methods).encode()),),
                )
            if group in self.restricted:
                rule = self.restricted[group]
                given = headers.get(rule.header.encode())
                permitted(rule, None if given is None else given.decode("latin-1"))
            identity = None if found.action in WITHOUT_KEY else self._identity(scope, headers)
            body = await self._body(headers, receive) if scope["method"] == "POST" else b""
            if body is None:
                return  # the client went away while sending: nobody to answer
            if found.action == "infer":
                status, payload, extra = await self._infer(found, headers, body, identity)
            elif found.action.startswith("shm_"):
                status, payload, extra = await self._shared_memory(found, body, identity)
            else:
                status, payload, extra = await self.handlers[found.action](found, headers, body)
        except HttpError as err:
            status, payload, extra = err.status, json_body({"error": str(err)}), (*JSON_TYPE, *err.headers)
        except ServingError as err:
            status, payload, extra = STATUS.get(type(err), 400), json_body({"error": str(err)}), JSON_TYPE
            if isinstance(err, Unauthenticated):
                extra = (*JSON_TYPE, *CHALLENGE)
            elif isinstance(err, TenantRefused):
                extra = (*JSON_TYPE, (b"retry-after", str(math.ceil(err.retry_after)).encode()))
        except Exception:
            log.exception("HTTP %r %r failed", scope["method"], scope["path"])  # %r: the caller's text, escaped
            message = f"{scope['method']} {scope['path']}: internal error; the server log has details"
            status, payload, extra = 500, json_body({"error": message}), JSON_TYPE
        response_headers = [*extra, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})

    def _identity(self, scope, headers: dict) -> Identity:
        """Who is calling; Unauthenticated when keys are required and it has no valid one."""
        auth = self.auth
        if not auth.reads_calls:
            return auth.anonymous
        certificate = http_client_name(scope) if auth.mutual_tls else None
        return auth.identify(_text(headers.get(AUTHORIZATION_KEY)), certificate, _text(headers.get(TENANT_KEY)))

    async def _body(self, headers: dict, receive) -> bytes | None:
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type not in BODY_TYPES:
            raise HttpError(
                400, f"content type {content_type!r} is not accepted; send application/json or application/octet-stream"
            )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise HttpError(
                400, f"the body is {int(declared)} bytes; at most {self.max_body_bytes} (--http-max-body-bytes)"
            )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise HttpError(400, f"the body exceeds {self.max_body_bytes} bytes (--http-max-body-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # --- health and metadata ----------------------------------------------------------------------

    async def _live(self, found: Route, headers: dict, body: bytes):
        return 200, b"", ()

    async def _ready(self, found: Route, headers: dict, body: bytes):
        return (200 if self.core.ready() else 400), b"", ()

    async def _model_ready(self, found: Route, headers: dict, body: bytes):
        return (200 if await self.core.model_ready(found.model, found.version) else 400), b"", ()

    async def _server(self, found: Route, headers: dict, body: bytes):
        said = extensions(self.regions is not None)
        return _json({"name": self.name, "version": server_version(), "extensions": said})

    async def _metadata(self, found: Route, headers: dict, body: bytes):
        model = await self.info.model(found.model, found.version)
        versions = await self.info.ready_versions(model.name)
        signature = model.signature
        return _json(
            {
                "name": model.name,
                "versions": versions,
                "platform": PLATFORM,
                "inputs": _tensors(signature.inputs),
                "outputs": _tensors(signature.outputs),
            }
        )

    async def _config(self, found: Route, headers: dict, body: bytes):
        return _json(proto_json(await self.info.config(found.model, found.version)))

    async def _stats(self, found: Route, headers: dict, body: bytes):
        return _json(proto_json(await self.info.statistics(found.model, found.version)))

    # --- inference ----------------------------------------------------------------------------------

    async def _infer(self, found: Route, headers: dict, body: bytes, identity: Identity):
        core = self.core
        with core.request(HTTP, identity) as call:
            if self.traced and b"traceparent" in headers:
                call.trace_parent = (headers[b"traceparent"].decode("latin-1"), _text(headers.get(b"tracestate")) or "")
            model = await core.resolve(call, found.model, found.version)
            regions = TenantRegions(self.regions, identity.tenant) if self.regions is not None else None
            length = _text(headers.get(HEADER_LENGTH_KEY))
            request, decoded, binary, placed = await self._decode_placed(body, length, model.signature, regions)
            call.request_id = request.id or ""
            answer = await core.infer(call, decoded, request.parameters)
            outputs = [(model.signature.output(name), answer.outputs[name], binary[name]) for name in decoded.outputs]
            said = dict(core.accounting(call, answer))
            weight = sum(encode_weight(a, not binary and spec.name not in placed) for spec, a, binary in outputs)
            encoded = await self.offload.run(weight, _respond, model, request.id, outputs, said, placed)
        if encoded.header_length is None:
            return 200, encoded.body, JSON_TYPE
        return (
            200,
            encoded.body,
            (
                (b"content-type", b"application/octet-stream"),
                (HEADER_LENGTH_KEY, str(encoded.header_length).encode()),
            ),
        )

    async def _decode_placed(self, body: bytes, header_length: str | None, signature, regions):
        """_decode, and the outputs asked for in shared memory; a front end in a process of its own
        maps the regions the request names as it meets them (shared_regions.with_regions)."""
        if regions is None or not regions.regions.remote:
            request, decoded, binary = await self._decode(body, header_length, signature, regions)
            return request, decoded, binary, output_regions(request.header, regions, signature.label)
        tenant = regions.tenant
        request, decoded, binary = await with_regions(
            self.regions, tenant, self._decode, body, header_length, signature, regions
        )
        placed = await with_regions(self.regions, tenant, output_regions, request.header, regions, signature.label)
        return request, decoded, binary, placed

    async def _decode(self, body: bytes, header_length: str | None, signature, regions):
        """(HttpInfer, DecodedRequest, binary per output): a short JSON parsed on the loop, then decoded
        where its weight says (request_limits.Offload), so that binary numbers, which are views of the
        body, stay on the loop however big; a long JSON parsed and decoded in a codec thread."""
        json_length = _json_length(body, header_length)
        if json_length > OFFLOAD_BYTES:
            return await self.offload.in_thread(_decode, body, header_length, signature, self.limits, regions)
        request = split_body(body, header_length, self.limits.max_json_values, signature.label)
        weight = json_length + _binary_bytes_weight(request.header)
        decoded, binary = await self.offload.run(weight, decode_infer, request, signature, self.limits, regions)
        return request, decoded, binary

    # --- shared memory -------------------------------------------------------------------------------

    async def _shared_memory(self, found: Route, body: bytes, identity: Identity):
        if self.regions is None:
            raise HttpError(501, "shared memory is not served here")
        given = _object(body, f"registration of shared memory region '{found.model}'") if body else {}
        return await shared_memory(self.regions, found.version, found.action, found.model, given, identity.tenant)

    # --- model repository ---------------------------------------------------------------------------

    async def _index(self, found: Route, headers: dict, body: bytes):
        ready = bool(_object(body, "repository index").get("ready", False))
        return _json(await self.control.index(ready))

    async def _load(self, found: Route, headers: dict, body: bytes):
        given = _object(body, f"load of '{found.model}'").get("parameters") or {}
        if not isinstance(given, dict):
            raise InvalidInput(f"failed to load '{found.model}': 'parameters' must be an object")
        parameters = {}
        for key, value in given.items():
            parameters[key] = _file_bytes(found.model, key, value) if key.startswith("file:") else value
        await self.control.load(found.model, parameters)
        return 200, b"", ()

    async def _trace(self, found: Route, headers: dict, body: bytes):
        """Triton's trace settings, the server's or a model's: read (GET), or changed by a body's (POST)."""
        if not body.strip():
            return _json(rest_settings(await self.traces.view(found.model)))
        given = given_settings(_object(body, "trace settings"))
        return _json(rest_settings(await self.traces.update(found.model, given)))

    async def _unload(self, found: Route, headers: dict, body: bytes):
        await self.control.unload(found.model)
        return 200, b"", ()


def _decode(body: bytes, header_length: str | None, signature, limits: RequestLimits, regions=None):
    request = split_body(body, header_length, limits.max_json_values, signature.label)
    decoded, binary = decode_infer(request, signature, limits, regions)
    return request, decoded, binary


def _respond(model, request_id: str, outputs: list, said: dict, placed: dict):
    """The encoded response, the outputs asked for in shared memory written there first (together in a
    codec thread where the outputs are big)."""
    label = model.signature.label
    if placed:
        outputs = [_placed(spec, array, binary, placed, label) for spec, array, binary in outputs]
    return encode_infer(model.name, model.version, request_id, outputs, said)


def _placed(spec, array, binary: bool, placed: dict, label: str) -> tuple:
    """An output asked for in shared memory, written there (as the wire has it): the response names it."""
    if spec.name not in placed:
        return spec, array, binary
    region, offset, size = placed[spec.name]
    write_output(region, offset, size, output_bytes(spec.datatype, array), f"{label}: output '{spec.name}'")
    return spec, PlacedOutput(array.shape, region.name, offset, size), binary


def _json_length(body: bytes, header_length: str | None) -> int:
    """The JSON's length, as split_body will find it (or refuse the header)."""
    if header_length is not None and header_length.isascii() and header_length.isdigit() and len(header_length) < 20:
        return min(int(header_length), len(body))
    return len(body)


def _binary_bytes_weight(header: dict) -> int:
    """What decoding the BYTES inputs sent as binary data weighs; binary numbers weigh nothing."""
    weight, inputs = 0, header.get("inputs")
    for tensor in inputs if isinstance(inputs, list) else ():
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if isinstance(size, int) and size > 0 and tensor.get("datatype") == "BYTES":
            weight += raw_bytes_weight(size)
    return weight


def _tensors(specs) -> list[dict]:
    return [{"name": spec.name, "datatype": spec.datatype, "shape": spec.shape} for spec in specs]


def _json(value):
    return 200, json_body(value), JSON_TYPE


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _object(body: bytes, what: str) -> dict:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"{what}: the body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: the body must be a JSON object")
    return value


def _file_bytes(model: str, key: str, value) -> bytes:
    """Over HTTP a file parameter is base64, as Triton's REST API takes it."""
    if not isinstance(value, str):
        raise InvalidInput(f"failed to load '{model}': parameter {key!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"failed to load '{model}': parameter {key!r} is not valid base64") from None


async def start_http(
    settings: ServerSettings, api: HttpApi, connections: ConnectionMetrics | None = None, sock=None
) -> uvicorn.Server:
    """uvicorn in the running loop: its start-up and shutdown are called directly, so it installs
    no signal handlers of its own and the server's lifecycle stays in app.py. Each connection is
    bounded (server/frontend/connection_limits.py) and counted in `connections`. `sock`: a listening
    socket to serve instead of binding one (front-end processes share the engine's)."""
    config = uvicorn.Config(
        api,
        host=settings.http_address,
        port=settings.http_port,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        ws="none",  # no WebSocket upgrade: a connection speaks HTTP/1.1 under the limits, or nothing
        timeout_keep_alive=75,  # longer than the usual load balancer idle timeout (60 s)
        timeout_graceful_shutdown=settings.exit_timeout_secs,
        **uvicorn_tls(
            settings
        ),  # the limited protocol; under TLS, its files and a protocol that reads client certificates
    )
    return await listen(config, Listener("http", http_limits(settings, "http"), connections), sock)


def http_port(server: uvicorn.Server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]
