"""TLS and mutual TLS on real servers with real clients: tritonclient over gRPC and REST, /metrics
plain or https, onnxserve-health, bad certificate files at start, and the client's name that
server/frontend/tls.py reads (through small grpc.aio and uvicorn servers built from the real functions).
Certificates are made per module by the openssl CLI (tests/certificates.py)."""

import asyncio
import functools
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import gevent.ssl
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from server.config import parse_server_settings
from server.frontend.connection_limits import LimitedHttpToolsProtocol
from server.frontend.http_service import http_port, start_http
from server.frontend.http_tls import TlsHttpToolsProtocol
from server.frontend.tls import grpc_client_name, grpc_credentials, http_client_name
from tests.certificates import make_certificates
from tests.conftest import ROOT, start_server

MODELS = ROOT / "models"
X = np.random.default_rng(7).random((2, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def tls_flags(certs, endpoint: str, mutual: bool = False) -> list[str]:
    flags = [f"--{endpoint}-server-cert", str(certs.server.cert), f"--{endpoint}-server-key", str(certs.server.key)]
    if mutual:
        return [f"--{endpoint}-use-ssl-mutual", "true", *flags, f"--{endpoint}-root-cert", str(certs.ca.cert)]
    return [f"--{endpoint}-use-ssl", "true", *flags]


@pytest.fixture(scope="module")
def mutual_server(certs):
    """gRPC and REST under mutual TLS; /metrics left at its default, plain HTTP."""
    server = start_server(MODELS, *tls_flags(certs, "grpc", mutual=True), *tls_flags(certs, "http", mutual=True))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tls_server(certs):
    """gRPC, REST and /metrics under TLS, no client certificates."""
    server = start_server(MODELS, *tls_flags(certs, "grpc"), *tls_flags(certs, "http"), *tls_flags(certs, "metrics"))
    yield server
    assert server.stop() == 0


def expected() -> np.ndarray:
    session = ort.InferenceSession(str(MODELS / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


def grpc_infer(client: grpcclient.InferenceServerClient) -> np.ndarray:
    tensor = grpcclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer("mlp", [tensor], client_timeout=30).as_numpy("probabilities")


def grpc_client(server, certs, pair=None, **kwargs) -> grpcclient.InferenceServerClient:
    keys = {"private_key": str(pair.key), "certificate_chain": str(pair.cert)} if pair else {}
    return grpcclient.InferenceServerClient(
        server.url, ssl=True, root_certificates=str(certs.ca.cert), **keys, **kwargs
    )


def refused(call) -> str:
    with pytest.raises(grpcclient.InferenceServerException) as raised:
        call()
    return raised.value.status()


def test_the_log_says_which_ports_use_tls(mutual_server, tls_server):
    assert " (mTLS), metrics on http://" in mutual_server.log_text()
    assert " (TLS), metrics on https://" in tls_server.log_text()
    assert f"HTTP on 127.0.0.1:{tls_server.http_port} (TLS);" in tls_server.log_text()


def test_grpc_infers_under_tls_and_refuses_plain_text(tls_server, certs):
    np.testing.assert_allclose(grpc_infer(grpc_client(tls_server, certs)), expected(), rtol=1e-5)
    plain = grpcclient.InferenceServerClient(tls_server.url)
    assert refused(lambda: grpc_infer(plain)) == "StatusCode.UNAVAILABLE"


def test_grpc_under_mutual_tls_takes_only_certificates_of_its_root(mutual_server, certs):
    np.testing.assert_allclose(grpc_infer(grpc_client(mutual_server, certs, certs.client)), expected(), rtol=1e-5)
    assert refused(lambda: grpc_infer(grpc_client(mutual_server, certs))) == "StatusCode.UNAVAILABLE"  # no certificate
    stranger = grpc_client(mutual_server, certs, certs.stranger)  # CN=team-a too, but another CA signed it
    assert refused(lambda: grpc_infer(stranger)) == "StatusCode.UNAVAILABLE"
    plain = grpcclient.InferenceServerClient(mutual_server.url)
    assert refused(lambda: grpc_infer(plain)) == "StatusCode.UNAVAILABLE"


def http_infer(server, certs, pair=None, use_ssl_options: bool = False) -> np.ndarray:
    """tritonclient.http over TLS, configured either of its two ways: an SSLContext factory, or
    ssl_options for gevent.ssl.wrap_socket (deprecated ssl calls: warnings under pytest's -W error)."""
    if use_ssl_options:
        options = {"ca_certs": str(certs.ca.cert)} | (
            {"certfile": str(pair.cert), "keyfile": str(pair.key)} if pair else {}
        )
        client = httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_options=options)
    else:
        # The context checks the server's name itself; insecure=True only skips geventhttpclient's
        # second check, by the deprecated ssl.match_hostname
        factory = functools.partial(gevent_context, certs, pair)
        client = httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_context_factory=factory, insecure=True)
    try:
        tensor = httpclient.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(X)
        return client.infer("mlp", [tensor]).as_numpy("probabilities")
    finally:
        client.close()


def gevent_context(certs, pair=None) -> gevent.ssl.SSLContext:
    context = gevent.ssl.create_default_context(cafile=str(certs.ca.cert))
    assert context.check_hostname  # and verify_mode CERT_REQUIRED: the server's name and CA are checked
    if pair:
        context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


def https_get(port: int, path: str, context: ssl.SSLContext, timeout: float = 30) -> tuple[int, bytes]:
    return _get(http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout), path)


def plain_get(port: int, path: str) -> tuple[int, bytes]:
    return _get(http.client.HTTPConnection("127.0.0.1", port, timeout=30), path)


def _get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def client_context(certs, pair=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    if pair:
        context.load_cert_chain(pair.cert, pair.key)
    return context


def test_rest_infers_under_tls_and_refuses_plain_http(tls_server, certs):
    np.testing.assert_allclose(http_infer(tls_server, certs), expected(), rtol=1e-5)
    assert https_get(tls_server.http_port, "/v2/health/ready", client_context(certs))[0] == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        plain_get(tls_server.http_port, "/v2/health/ready")


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")  # gevent's wrap_socket
@pytest.mark.filterwarnings("ignore:ssl.match_hostname\\(\\) is deprecated:DeprecationWarning")  # geventhttpclient's
def test_rest_under_mutual_tls_takes_only_certificates_of_its_root(mutual_server, certs):
    np.testing.assert_allclose(http_infer(mutual_server, certs, certs.client), expected(), rtol=1e-5)
    np.testing.assert_allclose(
        http_infer(mutual_server, certs, certs.client, use_ssl_options=True), expected(), rtol=1e-5
    )
    assert https_get(mutual_server.http_port, "/v2/health/ready", client_context(certs, certs.client))[0] == 200
    for pair in (None, certs.stranger):  # no certificate; a certificate of another CA
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the alert may come as a reset
            https_get(mutual_server.http_port, "/v2/health/ready", client_context(certs, pair))
    with pytest.raises((OSError, http.client.HTTPException)):
        plain_get(mutual_server.http_port, "/v2/health/ready")


def test_metrics_stay_plain_unless_asked(mutual_server, tls_server, certs):
    assert "onnxserve_model_ready" in mutual_server.metrics()  # plain http://, though gRPC and REST use TLS
    with socket.create_connection(("127.0.0.1", tls_server.metrics_port)):  # connects, never says a word
        status, body = https_get(tls_server.metrics_port, "/metrics", client_context(certs), timeout=5)
    assert status == 200 and b'onnxserve_model_ready{model="mlp"' in body
    with pytest.raises((urllib.error.URLError, OSError, http.client.HTTPException)):
        tls_server.metrics()  # plain http:// to the https port


def health(server, environ: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ONNXSERVE_")} | environ
    command = [sys.executable, "-m", "server.tools.healthcheck", "--address", server.url, "--timeout", "10", *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def server_environment(certs, mutual: bool) -> dict[str, str]:
    environ = {"ONNXSERVE_GRPC_SERVER_CERT": str(certs.server.cert), "ONNXSERVE_GRPC_SERVER_KEY": str(certs.server.key)}
    if mutual:
        return environ | {"ONNXSERVE_GRPC_USE_SSL_MUTUAL": "true", "ONNXSERVE_GRPC_ROOT_CERT": str(certs.ca.cert)}
    return environ | {"ONNXSERVE_GRPC_USE_SSL": "true"}


def test_health_probe_speaks_tls_from_the_servers_environment(tls_server, certs):
    probe = health(tls_server, server_environment(certs, mutual=False))
    assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
    assert health(tls_server, {}).returncode == 1  # plain text to a TLS port


def test_health_probe_under_mutual_tls(mutual_server, certs):
    environ = server_environment(certs, mutual=True)
    probe = health(mutual_server, environ)  # the server's own certificate as the client's
    assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
    chosen = health(
        mutual_server, environ, "--client-cert", str(certs.client.cert), "--client-key", str(certs.client.key)
    )
    assert chosen.returncode == 0, chosen.stderr
    stranger = health(
        mutual_server, environ, "--client-cert", str(certs.stranger.cert), "--client-key", str(certs.stranger.key)
    )
    assert stranger.returncode == 1 and "UNAVAILABLE" in stranger.stderr


def start(*flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "server",
        "--model-repository",
        str(MODELS),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        *flags,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_certificate_files_stop_the_start_with_exit_2(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cases = [
        (["--grpc-server-cert", str(garbage)], f"--grpc-server-cert: {garbage}: no PEM certificate in it"),
        (["--grpc-server-key", str(certs.client.key)], f"--grpc-server-key: {certs.client.key} does not match"),
        (["--grpc-root-cert", ""], "--grpc-root-cert: needed by --grpc-use-ssl-mutual"),
        (
            ["--http-use-ssl", "true", "--http-server-cert", str(certs.server.cert), "--http-server-key", str(garbage)],
            f"--http-server-key: {garbage}: no PEM private key in it",
        ),
    ]
    for flags, message in cases:
        done = start(*tls_flags(certs, "grpc", mutual=True), *flags)  # argparse: the later flag wins
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
        assert "listening:" not in done.stderr


def settings_of(tmp_path, *flags: str):
    listen = ["--http-address", "127.0.0.1", "--http-port", "0"]
    return parse_server_settings(["--model-repository", str(tmp_path), *listen, *flags], {})


async def grpc_names(settings, certs, pair) -> str | None:
    """The name grpc_client_name gives a call made with pair (None: no client certificate)."""

    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return json.dumps(grpc_client_name(context)).encode()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("test.Who", {"Name": grpc.unary_unary_rpc_method_handler(who)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", grpc_credentials(settings))
    await server.start()
    keys = (pair.key.read_bytes(), pair.cert.read_bytes()) if pair else (None, None)
    credentials = grpc.ssl_channel_credentials(certs.ca.cert.read_bytes(), *keys)
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            return json.loads(await channel.unary_unary("/test.Who/Name")(b"", timeout=10))
    finally:
        await server.stop(0)


def test_grpc_client_name_is_the_verified_certificates_cn(certs, tmp_path):
    mutual = settings_of(tmp_path, *tls_flags(certs, "grpc", mutual=True))
    assert asyncio.run(grpc_names(mutual, certs, certs.client)) == "team-a"
    assert asyncio.run(grpc_names(mutual, certs, certs.server)) == "onnxserve"  # CN, not its subjectAltNames
    tls_only = settings_of(tmp_path, *tls_flags(certs, "grpc"))
    assert asyncio.run(grpc_names(tls_only, certs, certs.client)) is None  # not asked for, so never verified


async def who_app(scope, receive, send) -> None:
    """A bare ASGI app answering with what http_client_name reads from its scope."""
    body = json.dumps({"name": http_client_name(scope), "tls": "tls" in (scope.get("extensions") or {})}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def http_names(settings, get) -> tuple[type, list[dict]]:
    """start_http (the server's own) with who_app; two requests on one connection."""
    server = await start_http(settings, who_app)
    try:
        return server.config.http_protocol_class, await asyncio.to_thread(get, http_port(server))
    finally:
        await server.shutdown()


def two_requests(port: int, context: ssl.SSLContext | None) -> list[dict]:
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    answers = []
    try:
        for _ in range(2):  # keep-alive: the second request reuses the connection's TLS extension
            connection.request("GET", "/")
            answers.append(json.loads(connection.getresponse().read()))
    finally:
        connection.close()
    return answers


def test_http_client_name_is_the_verified_certificates_cn(certs, tmp_path):
    mutual = settings_of(tmp_path, *tls_flags(certs, "http", mutual=True))
    protocol, answers = asyncio.run(
        http_names(mutual, lambda port: two_requests(port, client_context(certs, certs.client)))
    )
    assert protocol is TlsHttpToolsProtocol and answers == [{"name": "team-a", "tls": True}] * 2
    tls_only = settings_of(tmp_path, *tls_flags(certs, "http"))
    _, answers = asyncio.run(http_names(tls_only, lambda port: two_requests(port, client_context(certs, certs.client))))
    assert answers == [{"name": None, "tls": True}] * 2  # TLS without client certificates
    protocol, answers = asyncio.run(http_names(settings_of(tmp_path), lambda port: two_requests(port, None)))
    assert (
        protocol is LimitedHttpToolsProtocol and answers == [{"name": None, "tls": False}] * 2
    )  # plain: no TLS extension
