"""Where traces go and how many: the OTEL_* variables, Triton's --trace-config over them, and the
trace settings a TraceSetting call reads and changes."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from server.errors import ConfigError, InvalidInput
from server.observe.trace_config import GRPC, HTTP, trace_config
from server.observe.trace_settings import TraceSettings, given_settings, rest_settings

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}


def test_no_endpoint_means_no_tracing_whatever_else_is_said():
    assert not trace_config((), {}).endpoint
    assert not trace_config(("rate=10", "level=TIMESTAMPS"), {"OTEL_TRACES_SAMPLER": "always_on"}).endpoint


def test_the_environment_gives_endpoint_protocol_and_sampling():
    config = trace_config(
        (),
        {
            **ENDPOINT,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        },
    )
    assert (config.endpoint, config.protocol, config.rate) == (
        "http://collector:4317",
        GRPC,
        0.25,
    )
    assert trace_config((), ENDPOINT).protocol == HTTP  # OpenTelemetry's default


def test_tritons_flags_win_over_the_environment():
    config = trace_config(
        (
            "mode=opentelemetry",
            "rate=100",
            "opentelemetry,url=localhost:4318/v1/traces",
            "opentelemetry,resource=team=ml",
        ),
        {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER_ARG": "1"},
    )
    assert config.endpoint == "http://localhost:4318/v1/traces" and config.endpoint_is_url
    assert (config.protocol, config.rate, config.resource) == (HTTP, 0.01, (("team", "ml"),))
    off = trace_config(("level=OFF",), ENDPOINT)  # the exporter runs; nothing is traced till a TraceSetting
    assert off.endpoint and TraceSettings(off).server["trace_level"] == ["OFF"]


@pytest.mark.parametrize(
    ("flags", "environment", "named"),
    [
        (("mode=triton",), {}, "--trace-config 'mode=triton'"),
        (("rate=0",), {}, "rate is a whole number"),
        (("level=LOUD",), {}, "level is one of"),
        (("triton,file=x",), {}, "only the opentelemetry mode"),
        (("opentelemetry,colour=red",), {}, "unknown opentelemetry setting 'colour'"),
        (("speed",), {}, "expected SETTING=VALUE"),
        ((), {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ((), {"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ((), {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag_or_variable(flags, environment, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        trace_config(flags, environment)


def test_a_models_settings_override_the_servers_and_clear_back_to_them():
    settings = TraceSettings(trace_config(("rate=2",), ENDPOINT))

    async def body():
        changed = await settings.update("m", {"trace_level": ["OFF"], "trace_rate": ["5"]})
        server = await settings.view("")
        cleared = await settings.update("m", {"trace_level": []})
        return changed, server, cleared

    changed, server, cleared = asyncio.run(body())
    assert (changed["trace_level"], changed["trace_rate"]) == (["OFF"], ["5"])
    assert (server["trace_level"], server["trace_rate"]) == (["TIMESTAMPS"], ["2"])
    assert (cleared["trace_level"], cleared["trace_rate"]) == (["TIMESTAMPS"], ["5"])
    assert [settings.sampled("m", draw) for draw in (0.0, 0.19, 0.2, 0.9)] == [True, True, False, False]


def test_trace_count_stops_tracing_after_that_many():
    settings = TraceSettings(trace_config((), ENDPOINT))
    asyncio.run(settings.update("", {"trace_count": ["2"]}))
    assert [settings.sampled("m", 0.0) for _ in range(4)] == [True, True, False, False]


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"trace_rate": ["0"]}, "trace_rate"),
        ({"trace_level": ["LOUD"]}, "trace_level"),
        ({"trace_mode": ["triton"]}, "opentelemetry mode only"),
        ({"colour": ["red"]}, "unknown trace setting 'colour'"),
        ({"trace_level": []}, "cannot be cleared"),
    ],
)
def test_bad_changes_are_refused_naming_the_setting(given, named):
    with pytest.raises(InvalidInput, match=named):
        asyncio.run(TraceSettings(trace_config((), ENDPOINT)).update("", given))


def test_without_an_exporter_tracing_cannot_be_turned_on():
    with pytest.raises(InvalidInput, match="no exporter endpoint"):
        asyncio.run(TraceSettings(trace_config((), {})).update("", {"trace_level": ["TIMESTAMPS"]}))


def test_rest_bodies_as_triton_writes_them():
    assert given_settings({"trace_rate": 10, "trace_level": ["OFF"], "trace_count": None}) == {
        "trace_rate": ["10"],
        "trace_level": ["OFF"],
        "trace_count": [],
    }
    assert rest_settings({"trace_level": ["OFF"], "trace_rate": ["10"]}) == {"trace_level": ["OFF"], "trace_rate": "10"}


def test_the_server_imports_no_opentelemetry_unless_tracing_is_on():
    code = (
        "import sys, server.app, server.frontend.process, server.frontend.http_service; "
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
