"""Where traces go and how many: OpenTelemetry's standard environment variables, and Triton's
`--trace-config` flags, which win where the two disagree. Tracing is on when an exporter endpoint is
configured (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, or Triton's `opentelemetry,url=`); with neither,
no exporter runs and no span is made. Light: the SDK itself is imported only when tracing is on
(server/observe/tracing.py)."""

from collections.abc import Mapping
from dataclasses import dataclass

from server.errors import ConfigError

FLAG = "--trace-config"
GRPC, HTTP = "grpc", "http/protobuf"
LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")  # Triton's; TENSORS traces as TIMESTAMPS does (no tensor data)
# OTEL_TRACES_SAMPLER -> the share of requests without a sampled parent that are traced (None: the _ARG)
SAMPLERS = {
    "always_on": 1.0,
    "always_off": 0.0,
    "traceidratio": None,
    "parentbased_always_on": 1.0,
    "parentbased_always_off": 0.0,
    "parentbased_traceidratio": None,
}


@dataclass(frozen=True)
class TraceConfig:
    endpoint: str = ""  # "" = tracing off
    protocol: str = HTTP  # OTLP over gRPC or HTTP/protobuf
    endpoint_is_url: bool = False  # Triton's url: the traces URL as given, path and all
    rate: float = 1.0  # the share of requests without a client's sampled trace that are traced
    level: str = "TIMESTAMPS"
    resource: tuple[tuple[str, str], ...] = ()  # Triton's opentelemetry,resource=KEY=VALUE
    where: str = "the environment"  # what set the endpoint, for the log


def trace_config(flags: tuple[str, ...], environ: Mapping[str, str]) -> TraceConfig:
    """The environment's settings, then each `--trace-config` flag over them; ConfigError names the flag
    or variable that is wrong."""
    values = _from_environment(environ)
    resource: list[tuple[str, str]] = []
    for text in flags:
        _apply_flag(text.strip(), values, resource)
    return TraceConfig(**values, resource=tuple(resource))


def _from_environment(environ: Mapping[str, str]) -> dict:
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or HTTP
    if protocol not in (GRPC, HTTP):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not {GRPC!r} or {HTTP!r}")
    return {"endpoint": endpoint.strip(), "protocol": protocol, "rate": _sampled_share(environ)}


def _sampled_share(environ: Mapping[str, str]) -> float:
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not one of {sorted(SAMPLERS)}")
    share = SAMPLERS[sampler]
    if share is not None:
        return share
    argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        share = float(argument)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {argument!r} is not a ratio between 0 and 1")
    return share


def _apply_flag(text: str, values: dict, resource: list) -> None:
    """One `--trace-config` item: Triton's `mode=`, `rate=`, `level=`, `count=`, or for the
    OpenTelemetry mode `opentelemetry,url=`, `opentelemetry,resource=KEY=VALUE`."""
    section, comma, setting = text.partition(",")
    if comma and section.strip() != "opentelemetry":
        raise ConfigError(f"{FLAG} {text!r}: only the opentelemetry mode's settings are served (not {section!r})")
    key, equals, value = (setting if comma else text).partition("=")
    key, value = key.strip(), value.strip()
    if not equals:
        raise ConfigError(f"{FLAG} {text!r}: expected SETTING=VALUE or opentelemetry,SETTING=VALUE")
    if comma:
        _opentelemetry_setting(text, key, value, values, resource)
    elif key == "mode":
        if value != "opentelemetry":
            raise ConfigError(f"{FLAG} {text!r}: onnxserve traces in the opentelemetry mode only")
    elif key == "rate":
        values["rate"] = 1.0 / _positive(text, value)  # Triton's rate: one request in N
    elif key == "level":
        if value.upper() not in LEVELS:
            raise ConfigError(f"{FLAG} {text!r}: level is one of {LEVELS}")
        values["level"] = "TIMESTAMPS" if value.upper() == "TENSORS" else value.upper()
    elif key in ("count", "log-frequency", "file"):  # Triton's own trace files and budgets: nothing to do here
        return
    else:
        raise ConfigError(f"{FLAG} {text!r}: unknown setting {key!r}")


def _opentelemetry_setting(text: str, key: str, value: str, values: dict, resource: list) -> None:
    if key == "url":
        if not value:
            raise ConfigError(f"{FLAG} {text!r}: url is empty")
        url = value if "://" in value else f"http://{value}"  # Triton's examples give host:port/v1/traces
        values.update(endpoint=url, protocol=HTTP, endpoint_is_url=True, where=FLAG)
    elif key == "resource":
        name, equals, attribute = value.partition("=")
        if not equals or not name.strip():
            raise ConfigError(f"{FLAG} {text!r}: resource is KEY=VALUE")
        resource.append((name.strip(), attribute.strip()))
    elif not key.startswith("bsp_"):  # the batch span processor's tuning: ours is bounded on its own
        raise ConfigError(f"{FLAG} {text!r}: unknown opentelemetry setting {key!r}")


def _positive(text: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{FLAG} {text!r}: rate is a whole number >= 1 (one request traced in N)")
    return number
