"""Who a caller is, and what it may learn, at the edges: one rule for a client certificate's name over
gRPC and REST, an API key revoked while its stream is open, model names that cannot be files or log
lines, and what NOT_FOUND and per-model readiness tell a caller without a key. Real servers, real
clients (tritonclient, urllib)."""

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.certificates import make_certificates, make_leaf
from tests.conftest import wait_until
from tests.integration.test_tenants import INFER_BODY, bearer, write_keys
from tests.integration.test_tenants import refused_status as refused

X = np.arange(8, dtype=np.float32).reshape(2, 4)
# More than NAME_MAX (255) bytes; a newline that would start a forged log line; a NUL that ends a C
# string; a Unicode line separator, which some log viewers break lines at too.
BAD_NAMES = ("m" * 300, "plus\nINJECTED model line", "plus\x00nul", "plus\u2028INJECTED")


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    onnx_models.write(root, "plus", onnx_models.add_constant(1))
    return root


def tensor() -> grpcclient.InferInput:
    given = grpcclient.InferInput("x", list(X.shape), "FP32")
    given.set_data_from_numpy(X)
    return given


def rest(base: str, path: str, headers: dict | None = None, body: bytes | None = None, context=None):
    """(status, parsed JSON body or None) of one REST call."""
    request = urllib.request.Request(base + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as err:
        text = err.read()
        return err.code, json.loads(text) if text else None


# --- 1. one rule for a client certificate's name ------------------------------------------------


def mutual_flags(certs) -> list[str]:
    flags = []
    for endpoint in ("grpc", "http"):
        flags += [
            f"--{endpoint}-use-ssl-mutual",
            f"--{endpoint}-server-cert",
            str(certs.server.cert),
            f"--{endpoint}-server-key",
            str(certs.server.key),
            f"--{endpoint}-root-cert",
            str(certs.ca.cert),
        ]
    return flags


def tenants(server, certs, pair) -> tuple[str, str]:
    """Who one inference with pair's certificate is billed to over gRPC, and over REST (or the refusal)."""
    client = grpcclient.InferenceServerClient(
        server.url,
        ssl=True,
        root_certificates=str(certs.ca.cert),
        private_key=str(pair.key),
        certificate_chain=str(pair.cert),
    )
    try:
        over_grpc = client.infer("plus", [tensor()]).get_response().parameters["onnxserve_tenant"].string_param
    except InferenceServerException as err:
        over_grpc = str(err.status())
    finally:
        client.close()
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    context.load_cert_chain(str(pair.cert), str(pair.key))
    status, body = rest(
        f"https://localhost:{server.http_port}", "/v2/models/plus/infer", body=INFER_BODY, context=context
    )
    return over_grpc, body["parameters"]["onnxserve_tenant"] if status == 200 else str(status)


def test_one_certificate_names_one_tenant_over_grpc_and_rest(tmp_path, repository, serve):
    certs = make_certificates(tmp_path / "certs")
    # the subject /CN=team-first/O=acme/CN=team-second, in certificate order (openssl's -subj)
    multi = make_leaf(tmp_path / "certs", "multi", certs.ca, "team-first/O=acme/CN=team-second")
    # OpenSSL's subject for gRPC escapes the bytes of ü as \\C3\\BC, Python's for REST keeps it
    escaped = make_leaf(tmp_path / "certs", "escaped", certs.ca, "Müller, GmbH\\+1")

    plain = serve(repository, *mutual_flags(certs))
    assert tenants(plain, certs, certs.client) == ("team-a", "team-a")  # one CN: it is the tenant
    assert tenants(plain, certs, multi) == ("unknown", "unknown"), "two CNs are ambiguous: no tenant, over both"
    assert "more than one CN" in plain.log_text()

    mapping = {"team-first": "t-first", "team-second": "t-second", "Müller, GmbH+1": "t-mueller"}
    keys = write_keys(tmp_path / "keys.json", {"key": "t-key"}, certificates=mapping)
    keyed = serve(repository, *mutual_flags(certs), "--api-keys", str(keys))
    assert tenants(keyed, certs, multi) == ("StatusCode.UNAUTHENTICATED", "401"), "refused the same way"
    assert tenants(keyed, certs, escaped) == ("t-mueller", "t-mueller")


# --- 2. a key revoked while its stream is open ---------------------------------------------------


def test_a_key_revoked_while_its_stream_is_open_stops_at_the_next_message(tmp_path, repository, serve):
    keys = write_keys(tmp_path / "keys.json", {"key-of-a": "team-a", "key-of-b": "team-b"})
    usage = tmp_path / "usage.log"
    server = serve(repository, "--api-keys", str(keys), "--usage-log", str(usage))
    answers: list = []
    client = server.client()
    client.start_stream(lambda result, error: answers.append(error or result), headers=bearer("key-of-a"))
    for _ in range(2):
        client.async_stream_infer("plus", [tensor()])
    assert wait_until(lambda: len(answers) == 2, timeout=10)
    assert [answer.get_response().parameters["onnxserve_tenant"].string_param for answer in answers] == ["team-a"] * 2

    write_keys(keys, {"key-of-b": "team-b"})  # key-of-a leaves the file
    assert wait_until(lambda: "API keys: reloaded" in server.log_text(), timeout=10)
    client.async_stream_infer("plus", [tensor()])
    assert wait_until(lambda: len(answers) == 3, timeout=10)
    time.sleep(0.3)  # room for a wrong answer to arrive
    client.stop_stream()
    assert len(answers) == 3 and isinstance(answers[2], InferenceServerException), answers
    assert str(answers[2].status()) == "StatusCode.UNAUTHENTICATED" and "not valid" in answers[2].message()

    samples = server.samples()
    assert samples.total("onnxserve_tenant_requests_total", tenant="team-a") == 2, "the refused message is not billed"
    assert samples.get("onnxserve_unauthenticated_requests_total", reason="invalid") == 1
    assert server.stop() == 0
    billed = [json.loads(line)["tenant"] for line in usage.read_text().splitlines()]
    assert billed == ["team-a", "team-a"]


# --- 3. model names ------------------------------------------------------------------------------


def test_bad_model_names_are_invalid_on_every_entry_point_and_never_split_a_log_line(repository, serve):
    server = serve(repository, "--model-control-mode", "explicit", "--load-model", "plus")
    client, base = server.client(), f"http://{server.http_url}"
    for name in BAD_NAMES:
        for call in (
            lambda: client.infer(name, [tensor()]),
            lambda: client.get_model_metadata(name),
            lambda: client.get_model_config(name),
            lambda: client.is_model_ready(name),
            lambda: client.get_inference_statistics(name),
            lambda: client.load_model(name),
            lambda: client.unload_model(name),
        ):
            status, message = refused(call)
            assert status == "StatusCode.INVALID_ARGUMENT" and "model name" in message, (name[:20], status, message)
        quoted = urllib.parse.quote(name, safe="")
        for tail, body in (("/infer", INFER_BODY), ("", None), ("/config", None), ("/ready", None), ("/stats", None)):
            status, answer = rest(base, f"/v2/models/{quoted}{tail}", body=body)
            assert status == 400 and "model name" in answer["error"], (name[:20], tail, status, answer)
        for action in ("load", "unload"):
            status, answer = rest(base, f"/v2/repository/models/{quoted}/{action}", body=b"{}")
            assert status == 400 and "model name" in answer["error"], (name[:20], action, status, answer)

    for name in ("..", "a/b", "a\\b"):  # not one path component (REST cannot carry these in one path segment)
        assert refused(lambda: client.load_model(name))[0] == "StatusCode.INVALID_ARGUMENT"
    status, message = refused(lambda: client.infer("plus", [tensor()], model_version="1\nINJECTED"))
    assert status == "StatusCode.INVALID_ARGUMENT" and "version must be a number" in message
    assert rest(base, "/v2/models/plus/versions/latest/config")[0] == 400

    # A config's text is the caller's too, logged as the load is asked for and in its failure.
    wrong_input = {
        "max_batch_size": 4,
        "input": [{"name": "x\nINJECTED tensor line", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    for config in ('{"max_batch_size": 4,\n"INJECTED": 1}', json.dumps(wrong_input)):
        assert refused(lambda: client.load_model("plus", config=config))[0] == "StatusCode.INVALID_ARGUMENT"
    assert wait_until(lambda: "version 1 failed to load" in server.log_text(), timeout=5)
    lines = server.log_text().splitlines()
    assert len([line for line in lines if "load of model 'plus' requested" in line]) == 2
    forged = [
        line for line in lines if "INJECTED" in line and not line[:4].isdigit()
    ]  # every line starts with its time
    assert not forged, forged
    assert client.is_model_ready("plus")  # the failed reload left it serving


# --- 4. what a caller without a key learns ---------------------------------------------------------


def test_with_keys_not_found_names_no_model_and_model_readiness_needs_a_key(tmp_path, repository, serve):
    keys = write_keys(tmp_path / "keys.json", {"key-of-a": "team-a"})
    server = serve(repository, "--api-keys", str(keys))
    client, base = server.client(), f"http://{server.http_url}"
    for call in (
        lambda: client.infer("nope", [tensor()], headers=bearer("key-of-a")),
        lambda: client.get_model_metadata("nope", headers=bearer("key-of-a")),
    ):
        status, message = refused(call)
        assert status == "StatusCode.NOT_FOUND" and "'nope'" in message and "plus" not in message, message
    status, message = refused(lambda: client.infer("plus", [tensor()], model_version="7", headers=bearer("key-of-a")))
    assert status == "StatusCode.NOT_FOUND" and "version 7" in message and "versions" not in message, message
    status, answer = rest(base, "/v2/models/nope/infer", bearer("key-of-a"), INFER_BODY)
    assert status == 404 and "plus" not in answer["error"] and "[" not in answer["error"]

    assert refused(lambda: client.is_model_ready("plus"))[0] == "StatusCode.UNAUTHENTICATED"
    assert refused(lambda: client.is_model_ready("nope"))[0] == "StatusCode.UNAUTHENTICATED"
    assert client.is_model_ready("plus", headers=bearer("key-of-a"))
    assert client.is_server_ready() and client.is_server_live()  # probes stay open
    assert rest(base, "/v2/models/plus/ready")[0] == 401
    assert rest(base, "/v2/models/plus/ready", bearer("key-of-a"))[0] == 200
    assert rest(base, "/v2/health/ready")[0] == 200 and rest(base, "/v2/health/live")[0] == 200


def test_without_keys_not_found_still_lists_the_models(repository, serve):
    server = serve(repository)
    status, message = refused(lambda: server.client().infer("nope", [tensor()]))
    assert status == "StatusCode.NOT_FOUND" and "loaded models: ['plus']" in message
    assert server.client().is_model_ready("plus")
