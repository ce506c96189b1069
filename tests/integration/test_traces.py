"""OpenTelemetry traces as an operator turns them on: OTEL_EXPORTER_OTLP_ENDPOINT pointed at a real
OTLP receiver (tests/otlp_receiver.py), which collects what the real SDK exporter in the server
sends; requests made with tritonclient over gRPC unary, streams and REST."""

import json
import queue
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from bench.otlp_receiver import OtlpReceiver
from tests import onnx_models
from tests.conftest import start_server, wait_until
from tests.integration.test_tenants import KEYS, bearer, write_keys
from tests.prometheus import prometheus_binary, start_prometheus

SPAN_KINDS = {"SERVER": 2}
CHILDREN = ["compute", "decode", "encode", "queue"]
CLIENT_TRACE = "0af7651916cd43dd8448eb211c6e9999"
CLIENT_SPAN = "b7ad6b7169203331"


def simple_inputs(module, value: int = 1):
    tensors = [module.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in tensors:
        tensor.set_data_from_numpy(np.full((1, 16), value, dtype=np.int32))
    return tensors


def traced_server(tmp_path, receiver: OtlpReceiver, *flags: str, config: str = "max_batch_size: 8", **environment: str):
    onnx_models.write(tmp_path, "simple", onnx_models.simple(), config)
    protocol = "grpc" if receiver.protocol == "grpc" else "http/protobuf"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, **environment}
    return start_server(tmp_path, *flags, environment=env)


@pytest.fixture
def receiver():
    with OtlpReceiver("grpc").start() as running:
        yield running


def trees(spans) -> dict[str, dict]:
    """trace id -> {"request": its request span, "children": {name: span}} for each traced request."""
    found = {}
    for span in spans:
        if span.name.startswith("infer "):
            found.setdefault(span.trace_id, {"children": {}})["request"] = span
    for span in spans:
        if span.trace_id in found and not span.name.startswith("infer "):
            found[span.trace_id]["children"][span.name] = span
    return found


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_is_a_span_with_its_decode_queue_compute_and_encode_and_a_batch_links_to_it(tmp_path, protocol):
    with OtlpReceiver(protocol).start() as receiver:
        server = traced_server(tmp_path, receiver)
        try:
            result = grpcclient.InferenceServerClient(server.url).infer("simple", simple_inputs(grpcclient))
            trace_id = result.get_response().parameters["onnxserve_trace_id"].string_param
            spans = receiver.wait_for(lambda spans: len(spans) >= 6)
        finally:
            server.stop()
    tree = trees(spans)[trace_id]
    request, children = tree["request"], tree["children"]
    assert request.name == "infer simple" and request.kind == SPAN_KINDS["SERVER"] and request.parent_span_id == ""
    assert request.resource["service.name"] == "onnxserve"
    attributes = request.attributes
    assert (attributes["onnxserve.model"], attributes["onnxserve.version"]) == ("simple", "1")
    assert (attributes["onnxserve.protocol"], attributes["onnxserve.outcome"], attributes["onnxserve.rows"]) == (
        "grpc",
        "ok",
        1,
    )
    assert attributes["onnxserve.cost_dollars"] > 0 and attributes["onnxserve.tenant"] == "unknown"  # no API keys
    assert sorted(children) == CHILDREN
    assert all(child.parent_span_id == request.span_id for child in children.values())
    order = [children[name] for name in ("decode", "queue", "compute", "encode")]
    assert request.start_ns <= order[0].start_ns <= order[1].start_ns <= order[2].start_ns <= order[3].start_ns
    assert order[3].end_ns <= request.end_ns
    batch = next(span for span in spans if span.name == "batch simple")
    assert (request.trace_id, request.span_id) in batch.links
    assert children["compute"].links == ((batch.trace_id, batch.span_id),)
    assert batch.attributes["onnxserve.batch_id"] == attributes["onnxserve.batch_id"]
    assert batch.attributes["onnxserve.batch_cost_dollars"] > 0 and batch.attributes["onnxserve.rows"] == 1


def test_a_batch_links_to_every_request_that_rode_in_it_over_streams_and_rest(tmp_path, receiver):
    waits = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 50000 }"  # they share batches
    server = traced_server(tmp_path, receiver, config=waits)
    try:
        answers: queue.Queue = queue.Queue()
        stream = grpcclient.InferenceServerClient(server.url)
        stream.start_stream(callback=lambda result, error: answers.put((result, error)))
        for number in range(12):  # sent at once: they share batches
            stream.async_stream_infer("simple", simple_inputs(grpcclient, number), request_id=str(number))
        results = [answers.get(timeout=30) for _ in range(12)]
        stream.stop_stream()
        rest = httpclient.InferenceServerClient(server.http_url).infer("simple", simple_inputs(httpclient))
        spans = receiver.wait_for(lambda spans: len(trees(spans)) >= 13 and len(spans) >= 13 * 5)
    finally:
        server.stop()
    assert [error for _, error in results if error is not None] == []
    found = trees(spans)
    protocols = sorted(tree["request"].attributes["onnxserve.protocol"] for tree in found.values())
    assert protocols == ["grpc"] * 12 + ["http"]
    assert rest.get_response()["parameters"]["onnxserve_trace_id"] in found
    batches = {span.attributes["onnxserve.batch_id"]: span for span in spans if span.name == "batch simple"}
    for tree in found.values():
        request = tree["request"]
        batch = batches[request.attributes["onnxserve.batch_id"]]
        assert (request.trace_id, request.span_id) in batch.links
        assert len(batch.links) == batch.attributes["onnxserve.requests"]
    assert any(len(batch.links) > 1 for batch in batches.values()), "no batch carried two requests"


def test_a_clients_trace_is_followed_and_an_unsampled_one_is_not_traced(tmp_path, receiver):
    server = traced_server(tmp_path, receiver)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        sampled = client.infer(
            "simple", simple_inputs(grpcclient), headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        unsampled = client.infer(
            "simple", simple_inputs(grpcclient), headers={"traceparent": f"00-{'1' * 32}-{CLIENT_SPAN}-00"}
        )
        spans = receiver.wait_for(lambda spans: any(span.name.startswith("infer") for span in spans))
    finally:
        server.stop()
    assert sampled.get_response().parameters["onnxserve_trace_id"].string_param == CLIENT_TRACE
    assert "onnxserve_trace_id" not in unsampled.get_response().parameters
    request = trees(spans)[CLIENT_TRACE]["request"]
    assert request.parent_span_id == CLIENT_SPAN
    assert {span.trace_id for span in spans if span.name != "batch simple"} == {CLIENT_TRACE}


def test_the_rate_samples_and_trace_settings_change_it_while_serving(tmp_path, receiver):
    server = traced_server(tmp_path, receiver, "--trace-config", "rate=4", "--trace-config", "mode=opentelemetry")
    grpc_client, rest = grpcclient.InferenceServerClient(server.url), httpclient.InferenceServerClient(server.http_url)
    try:
        settings = grpc_client.get_trace_settings(as_json=True)["settings"]
        assert settings["trace_rate"]["value"] == ["4"] and settings["trace_level"]["value"] == ["TIMESTAMPS"]
        traced = sum(
            "onnxserve_trace_id" in grpc_client.infer("simple", simple_inputs(grpcclient)).get_response().parameters
            for _ in range(200)
        )
        assert 20 <= traced <= 80, traced  # one in four, give or take

        rest.update_trace_settings(model_name="simple", settings={"trace_level": ["OFF"]})
        assert rest.get_trace_settings(model_name="simple")["trace_level"] == ["OFF"]
        assert rest.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]  # the server's own is unchanged
        for _ in range(5):
            assert (
                "onnxserve_trace_id"
                not in grpc_client.infer("simple", simple_inputs(grpcclient)).get_response().parameters
            )

        grpc_client.update_trace_settings(model_name="simple", settings={"trace_level": None, "trace_rate": "1"})
        after = grpc_client.infer("simple", simple_inputs(grpcclient)).get_response().parameters
        assert "onnxserve_trace_id" in after
        with pytest.raises(Exception, match="trace_rate"):
            rest.update_trace_settings(settings={"trace_rate": "0"})
    finally:
        server.stop()


def test_a_collector_that_is_down_or_slow_fails_no_request_and_drops_are_counted(tmp_path):
    with OtlpReceiver("grpc", fail=True).start() as down:
        server = traced_server(tmp_path, down, OTEL_EXPORTER_OTLP_TIMEOUT="1")
        client = grpcclient.InferenceServerClient(server.url)
        try:
            for _ in range(20):
                assert client.infer("simple", simple_inputs(grpcclient)).as_numpy("OUTPUT0").sum() == 32
            assert wait_until(lambda: server.metric("onnxserve_trace_spans_dropped_total") >= 20 * 6, timeout=15)
        finally:
            server.stop()
        assert down.exports() >= 1
    with OtlpReceiver("http", delay=2.0).start() as slow:
        server = traced_server(tmp_path / "slow", slow)
        client = grpcclient.InferenceServerClient(server.url)
        try:
            answered = [client.infer("simple", simple_inputs(grpcclient)) for _ in range(20)]
            assert len(answered) == 20 and slow.exports() <= 1  # answered before the first export came back
        finally:
            server.stop()


def test_tenants_and_json_logs_carry_into_the_trace(tmp_path, receiver):
    keys = write_keys(tmp_path / "keys.json", KEYS)
    server = traced_server(
        tmp_path / "repository", receiver, "--api-keys", str(keys), "--log-format", "json", "--log-level", "DEBUG"
    )
    try:
        result = grpcclient.InferenceServerClient(server.url).infer(
            "simple", simple_inputs(grpcclient), headers=bearer("key-of-a")
        )
        trace_id = result.get_response().parameters["onnxserve_trace_id"].string_param
        spans = receiver.wait_for(lambda spans: trace_id in trees(spans))
    finally:
        server.stop()
    assert trees(spans)[trace_id]["request"].attributes["onnxserve.tenant"] == "team-a"
    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line.get("trace_id") == trace_id and len(line.get("span_id", "")) == 16 for line in lines)


def test_latency_exemplars_carry_trace_ids_to_prometheus(tmp_path, receiver):
    binary = prometheus_binary()
    server = traced_server(tmp_path / "repository", receiver)
    prometheus = None
    try:
        client = grpcclient.InferenceServerClient(server.url)
        answers = [client.infer("simple", simple_inputs(grpcclient)).get_response() for _ in range(5)]
        ids = {answer.parameters["onnxserve_trace_id"].string_param for answer in answers}
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.metrics_port}/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        assert any(f'# {{trace_id="{trace_id}"}}' in text for trace_id in ids)
        (tmp_path / "prometheus").mkdir()
        prometheus = start_prometheus(
            binary, tmp_path / "prometheus", f"127.0.0.1:{server.metrics_port}", features=("exemplar-storage",)
        )
        query = "onnxserve_request_duration_seconds_bucket"
        assert wait_until(lambda: prometheus.exemplar_labels(query), timeout=30)
        assert {labels.get("trace_id") for labels in prometheus.exemplar_labels(query)} & ids
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def test_without_an_endpoint_no_exporter_runs_and_no_span_is_made(tmp_path):
    onnx_models.write(tmp_path, "simple", onnx_models.simple(), "max_batch_size: 8")
    server = start_server(tmp_path)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        assert "onnxserve_trace_id" not in client.infer("simple", simple_inputs(grpcclient)).get_response().parameters
        assert client.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["OFF"]
        with pytest.raises(Exception, match="no exporter endpoint is configured"):
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
        assert "onnxserve_trace_spans_dropped" not in server.metrics()
        assert not any("trace-export" in name for name in thread_names(server.process.pid))
    finally:
        server.stop()


def thread_names(pid: int) -> list[str]:
    return [(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()]


def test_traces_cross_front_end_processes(tmp_path, receiver):
    server = traced_server(tmp_path, receiver, "--frontends", "2")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        result = client.infer(
            "simple", simple_inputs(grpcclient), headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        spans = receiver.wait_for(lambda spans: CLIENT_TRACE in trees(spans))
    finally:
        server.stop()
    assert result.get_response().parameters["onnxserve_trace_id"].string_param == CLIENT_TRACE
    tree = trees(spans)[CLIENT_TRACE]
    assert tree["request"].parent_span_id == CLIENT_SPAN and sorted(tree["children"]) == CHILDREN
