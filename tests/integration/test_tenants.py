"""Who calls and what they spend: API keys over gRPC and REST, key rotation while serving, tenant
sources and their precedence, the bound on tenant series, and cost conserved per tenant."""

import hashlib
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.certificates import make_certificates
from tests.conftest import ROOT, wait_until
from tests.tenant_load import TenantLoad

KEYS = {"key-of-a": "team-a", "key-of-b": "team-b", "key-of-c": "team-c"}
PRICE = ("--device-price", "cpu=36")
BATCHING = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 3000 }"


def write_keys(path: Path, keys: dict[str, str], **extra) -> Path:
    entries = [{"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": tenant} for key, tenant in keys.items()]
    text = json.dumps({"keys": entries, **extra})
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)  # as an operator would: never a half-written file
    return path


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def plus_one(tmp_path: Path, config: str | None = None) -> Path:
    repository = tmp_path / "models"
    onnx_models.write(repository, "plus", onnx_models.add_constant(1), config)
    return repository


def grpc_infer(client, rows: int = 2, **kwargs):
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("plus", [tensor], **kwargs)
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    return result.get_response().parameters


def http_call(server, path: str, headers: dict[str, str] | None = None, body: bytes | None = None):
    """(status, headers, JSON body) of one REST call."""
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, response.headers, json.loads(text) if text else None
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read() or b"null")


INFER_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()


def refused_status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return str(raised.value.status()), raised.value.message()


def test_api_keys_over_grpc_and_rest_with_probes_open(tmp_path, serve):
    keys = write_keys(tmp_path / "keys.json", KEYS)
    server = serve(plus_one(tmp_path), "--api-keys", str(keys))
    client = server.client()

    assert grpc_infer(client, headers=bearer("key-of-a"))["onnxserve_tenant"].string_param == "team-a"
    status, message = refused_status(lambda: grpc_infer(client))
    assert status == "StatusCode.UNAUTHENTICATED" and "authorization: Bearer <key>" in message
    status, message = refused_status(lambda: grpc_infer(client, headers=bearer("key-of-z")))
    assert status == "StatusCode.UNAUTHENTICATED" and "not valid" in message
    status, _ = refused_status(lambda: grpc_infer(client, headers={"authorization": "Basic a2V5LW9mLWE="}))
    assert status == "StatusCode.UNAUTHENTICATED"

    # Server health and readiness stay open for probes; a model's readiness (it would tell anyone which
    # names exist), metadata, config, statistics and the repository need a key.
    assert client.is_server_live() and client.is_server_ready()
    assert refused_status(lambda: client.is_model_ready("plus"))[0] == "StatusCode.UNAUTHENTICATED"
    assert client.is_model_ready("plus", headers=bearer("key-of-a"))
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for call in (
        lambda **h: client.get_model_metadata("plus", **h),
        lambda **h: client.get_model_config("plus", **h),
        lambda **h: client.get_inference_statistics("plus", **h),
        lambda **h: client.get_model_repository_index(**h),
        lambda **h: client.get_server_metadata(**h),
    ):
        assert refused_status(call)[0] == "StatusCode.UNAUTHENTICATED"
        assert call(headers=bearer("key-of-b")) is not None

    assert http_call(server, "/v2/health/ready")[0] == 200
    assert http_call(server, "/v2/models/plus/ready")[0] == 401
    status, headers, body = http_call(server, "/v2/models/plus/infer", body=INFER_BODY)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and "API key is required" in body["error"]
    assert http_call(server, "/v2/models/plus/infer", bearer("key-of-z"), INFER_BODY)[0] == 401
    assert http_call(server, "/v2/models/plus/config")[0] == 401
    status, _, body = http_call(server, "/v2/models/plus/infer", bearer("key-of-c"), INFER_BODY)
    assert (
        status == 200
        and body["parameters"]["onnxserve_tenant"] == "team-c"
        and body["outputs"][0]["data"] == [2, 3, 4, 5]
    )
    http = httpclient.InferenceServerClient(server.http_url)
    assert http.get_model_metadata("plus", headers=bearer("key-of-a"))["name"] == "plus"

    samples = server.samples()
    assert (
        samples.get("onnxserve_unauthenticated_requests_total", reason="missing") == 2 + 1 + 5 + 3
    )  # gRPC, Basic, ready, 5 RPCs, REST
    assert samples.get("onnxserve_unauthenticated_requests_total", reason="invalid") == 2
    assert samples.get("onnxserve_tenant_requests_total", tenant="team-a", model="plus", version="1", outcome="ok") == 1
    assert samples.get("onnxserve_tenant_requests_total", tenant="team-c", model="plus", version="1", outcome="ok") == 1


def test_keys_rotate_while_serving_and_a_broken_file_keeps_the_old_ones(tmp_path, serve):
    # A Kubernetes Secret volume: the file is a symlink through ..data, which an update swaps.
    secret = tmp_path / "secret"
    (secret / "v1").mkdir(parents=True)
    write_keys(secret / "v1" / "api-keys.json", {"key-of-a": "team-a", "key-of-c": "team-c"})
    (secret / "..data").symlink_to("v1")
    (secret / "api-keys.json").symlink_to("..data/api-keys.json")
    server = serve(plus_one(tmp_path), "--api-keys", str(secret / "api-keys.json"))
    client = server.client()
    load = TenantLoad(server.url, "plus", {"steady": bearer("key-of-c")}, callers=4).start()  # valid throughout
    try:
        assert wait_until(lambda: len(load.results) > 20, timeout=20)
        grpc_infer(client, headers=bearer("key-of-a"))

        (secret / "v2").mkdir()
        write_keys(secret / "v2" / "api-keys.json", {"key-of-b": "team-b", "key-of-c": "team-c"})
        (secret / "..data.tmp").symlink_to("v2")
        os.replace(secret / "..data.tmp", secret / "..data")
        assert wait_until(lambda: _accepted(client, "key-of-b"), timeout=10), server.log_text()
        assert refused_status(lambda: grpc_infer(client, headers=bearer("key-of-a")))[0] == "StatusCode.UNAUTHENTICATED"

        (secret / "v2" / "api-keys.json").write_text('{"keys": [{"sha256": "not hex"')  # a broken update
        assert wait_until(lambda: "API keys: the changed file is not used" in server.log_text(), timeout=10)
        assert "--api-keys" in server.log_text() and "not valid JSON" in server.log_text()
        assert grpc_infer(client, headers=bearer("key-of-b"))["onnxserve_tenant"].string_param == "team-b"
    finally:
        load.stop()
    assert not load.wrong
    assert {result.outcome for result in load.results.values()} == {"ok"}, "the steady key was never refused"
    assert {result.tenant for result in load.results.values()} == {"team-c"}


def _accepted(client, key: str) -> bool:
    try:
        grpc_infer(client, headers=bearer(key))
    except InferenceServerException:
        return False
    return True


def test_tenant_sources_and_their_precedence(tmp_path, serve):
    repository = plus_one(tmp_path)
    keys = write_keys(tmp_path / "keys.json", KEYS)
    claims = {"x-tenant-id": "team-claimed"}

    untrusted = serve(repository)
    assert grpc_infer(untrusted.client(), headers=claims)["onnxserve_tenant"].string_param == "unknown"
    status, _, body = http_call(untrusted, "/v2/models/plus/infer", claims, INFER_BODY)
    assert status == 200 and body["parameters"]["onnxserve_tenant"] == "unknown"
    untrusted.stop()

    gateway = serve(repository, "--trust-tenant-header")
    assert grpc_infer(gateway.client(), headers=claims)["onnxserve_tenant"].string_param == "team-claimed"
    assert grpc_infer(gateway.client())["onnxserve_tenant"].string_param == "unknown"
    assert (
        http_call(gateway, "/v2/models/plus/infer", claims, INFER_BODY)[2]["parameters"]["onnxserve_tenant"]
        == "team-claimed"
    )
    gateway.stop()

    keyed = serve(repository, "--trust-tenant-header", "--api-keys", str(keys))
    parameters = grpc_infer(keyed.client(), headers={**claims, **bearer("key-of-b")})
    assert parameters["onnxserve_tenant"].string_param == "team-b", "the key outranks the header"
    samples = keyed.samples()
    assert samples.get("onnxserve_tenant_requests_total", tenant="team-b", model="plus", version="1", outcome="ok") == 1
    assert not any("team-claimed" in str(key) for key in samples.values)


def test_tenants_past_the_series_limit_count_as_other(tmp_path, serve):
    log = tmp_path / "usage.log"
    server = serve(plus_one(tmp_path), "--trust-tenant-header", "--max-tenant-series", "2", "--usage-log", str(log))
    client = server.client()
    for tenant in ("t1", "t2", "t3", "t4", "t5", "t1", "t4"):
        assert grpc_infer(client, headers={"x-tenant-id": tenant})["onnxserve_tenant"].string_param == tenant
    samples = server.samples()
    requests = "onnxserve_tenant_requests_total"
    assert samples.get(requests, tenant="t1", model="plus", version="1", outcome="ok") == 2
    assert samples.get(requests, tenant="t2", model="plus", version="1", outcome="ok") == 1
    assert samples.get(requests, tenant="other", model="plus", version="1", outcome="ok") == 4
    assert samples.get("onnxserve_tenant_series_folded_total") == 3
    assert samples.total("onnxserve_tenant_cost_dollars_total", tenant="other") > 0
    assert not [key for key in samples.values if ("tenant", "t3") in key[1]]
    assert server.stop() == 0
    tenants = [json.loads(line)["tenant"] for line in log.read_text().splitlines()]
    assert tenants == ["t1", "t2", "t3", "t4", "t5", "t1", "t4"], "the usage log keeps the real names"


@pytest.mark.parametrize("frontends", [1, 2])
def test_cost_is_conserved_per_tenant_over_concurrent_mixed_batches(tmp_path, serve, frontends):
    keys = write_keys(tmp_path / "keys.json", KEYS)
    server = serve(plus_one(tmp_path, BATCHING), "--api-keys", str(keys), "--frontends", str(frontends), *PRICE)
    headers = {tenant: bearer(key) for key, tenant in KEYS.items()}
    load = TenantLoad(server.url, "plus", headers, callers=4, requests=40, own_connections=frontends > 1).run()
    assert not load.wrong
    assert len(load.ok()) == 3 * 4 * 40
    assert {result.frontend for result in load.results.values()} == ({1, 2} if frontends > 1 else {0})
    tenants_by_batch: dict[int, set[str]] = {}
    for result in load.results.values():
        tenants_by_batch.setdefault(result.batch_id, set()).add(result.tenant)
    assert any(len(tenants) > 1 for tenants in tenants_by_batch.values()), "some batches mixed tenants"

    samples = server.samples()
    model_cost = samples.get("onnxserve_cost_dollars_total", model="plus", version="1", device="cpu")
    tenant_costs = {
        tenant: samples.get(
            "onnxserve_tenant_cost_dollars_total", tenant=tenant, model="plus", version="1", device="cpu"
        )
        for tenant in KEYS.values()
    }
    assert model_cost > 0 and all(cost > 0 for cost in tenant_costs.values())
    assert samples.total("onnxserve_tenant_cost_dollars_total") == pytest.approx(model_cost, rel=1e-9)
    assert sum(tenant_costs.values()) == pytest.approx(model_cost, rel=1e-9)
    for tenant, cost in tenant_costs.items():  # what each caller was told adds up to its tenant's counter
        told = sum(result.cost for result in load.results.values() if result.tenant == tenant)
        assert told == pytest.approx(cost, rel=1e-9)
    idle = samples.get("onnxserve_idle_cost_dollars_total", device="cpu")
    priced = samples.get("onnxserve_device_seconds_total", device="cpu") * 36 / 3600
    assert samples.total("onnxserve_cost_dollars_total") + idle == pytest.approx(priced, rel=1e-6)


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_under_mutual_tls_the_client_certificate_names_the_tenant(tmp_path, serve, frontends):
    """In one process and in front-end processes, which read the certificate themselves."""
    certs = make_certificates(tmp_path / "certs")
    repository = plus_one(tmp_path)
    mutual = []
    for endpoint in ("grpc", "http"):
        mutual += [
            f"--{endpoint}-use-ssl-mutual",
            f"--{endpoint}-server-cert",
            str(certs.server.cert),
            f"--{endpoint}-server-key",
            str(certs.server.key),
            f"--{endpoint}-root-cert",
            str(certs.ca.cert),
        ]
    client_keys = {
        "root_certificates": str(certs.ca.cert),
        "private_key": str(certs.client.key),
        "certificate_chain": str(certs.client.cert),
    }

    mutual += ["--frontends", frontends]
    by_certificate = serve(repository, *mutual, "--trust-tenant-header")
    client = grpcclient.InferenceServerClient(by_certificate.url, ssl=True, **client_keys)
    assert grpc_infer(client, headers={"x-tenant-id": "team-claimed"})["onnxserve_tenant"].string_param == "team-a"
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    context.load_cert_chain(str(certs.client.cert), str(certs.client.key))
    request = urllib.request.Request(
        f"https://localhost:{by_certificate.http_port}/v2/models/plus/infer", data=INFER_BODY
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert json.loads(response.read())["parameters"]["onnxserve_tenant"] == "team-a"
    by_certificate.stop()

    # With keys, the file maps a certificate to a tenant (it then stands for a key); a key outranks it.
    keys = write_keys(tmp_path / "keys.json", KEYS, certificates={"team-a": "team-mapped"})
    keyed = serve(repository, *mutual, "--api-keys", str(keys))
    client = grpcclient.InferenceServerClient(keyed.url, ssl=True, **client_keys)
    assert grpc_infer(client)["onnxserve_tenant"].string_param == "team-mapped"
    assert grpc_infer(client, headers=bearer("key-of-b"))["onnxserve_tenant"].string_param == "team-b"
    with urllib.request.urlopen(
        request.full_url.replace(str(by_certificate.http_port), str(keyed.http_port)),
        data=INFER_BODY,
        context=context,
        timeout=10,
    ) as response:
        assert json.loads(response.read())["parameters"]["onnxserve_tenant"] == "team-mapped"


def test_a_stream_is_identified_once_and_needs_a_key(tmp_path, serve):
    keys = write_keys(tmp_path / "keys.json", KEYS)
    server = serve(plus_one(tmp_path), "--api-keys", str(keys))
    x = np.ones((1, 4), dtype=np.float32)
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    for headers, expected in ((bearer("key-of-b"), "team-b"), (None, "StatusCode.UNAUTHENTICATED")):
        answers: list = []
        client = server.client()
        client.start_stream(lambda result, error: answers.append(error or result), headers=headers)
        for _ in range(3 if headers else 0):  # a stream without a key is refused as it opens
            client.async_stream_infer("plus", [tensor])
        assert wait_until(lambda: len(answers) >= (3 if headers else 1), timeout=10)
        client.stop_stream()
        if headers:
            assert [a.get_response().parameters["onnxserve_tenant"].string_param for a in answers] == [expected] * 3
        else:
            assert str(answers[0].status()) == expected and "API key" in answers[0].message()


def test_a_bad_keys_file_or_usage_log_stops_the_start_naming_the_file(tmp_path):
    repository = plus_one(tmp_path)
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"sha256": "%s", "tenant": "other"}]}' % hashlib.sha256(b"k").hexdigest())
    unwritable = keys  # a file: nothing can be created under it, not even by root
    for flags, named in (
        (("--api-keys", str(keys)), f"--api-keys: {keys}: keys[0].tenant"),
        (("--usage-log", str(unwritable / "usage.log")), f"--usage-log: {unwritable / 'usage.log'}"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "server",
                "--model-repository",
                str(repository),
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--metrics-port",
                "0",
                *flags,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and named in done.stderr, done.stderr
