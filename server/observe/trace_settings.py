"""Triton's trace settings, for the server and per model, read and changed while serving (the
TraceSetting RPC, /v2/trace/setting and /v2/models/NAME/trace/setting). They say which requests are
traced: `trace_level` (OFF or TIMESTAMPS), `trace_rate` (one request in N, where the client sent no
sampled traceparent) and `trace_count` (how many more traces, -1 for no end). `trace_mode` is
opentelemetry; `trace_file` and `log_frequency` are Triton's own trace files, kept as given. A model's
setting left empty falls back to the server's. Light: no OpenTelemetry import."""

from server.errors import InvalidInput, shown
from server.observe.trace_config import LEVELS, TraceConfig

KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")


class TraceSettings:
    def __init__(self, config: TraceConfig) -> None:
        self.exporting = bool(config.endpoint)
        self.server = {
            "trace_level": [config.level if self.exporting else "OFF"],
            "trace_rate": [str(rate_of(config.rate))],
            "trace_count": ["-1"],
            "log_frequency": ["0"],
            "trace_file": [""],
            "trace_mode": ["opentelemetry"],
        }
        self.models: dict[str, dict[str, list[str]]] = {}
        self.left: dict[str, int] = {}  # "" or a model: traces left where trace_count was set
        self.decided: dict[str, tuple[bool, int]] = {}  # model -> (traced at all, rate): read per request

    def __repr__(self) -> str:
        return f"level {self.server['trace_level'][0]}, one request in {self.server['trace_rate'][0]}"

    def value(self, model: str, key: str) -> list[str]:
        return self.models.get(model, {}).get(key) or self.server[key]

    def _decided(self, model: str) -> tuple[bool, int]:
        found = self.decided.get(model)
        if found is None:
            on = self.value(model, "trace_level")[0] != "OFF"
            found = self.decided[model] = (on, int(self.value(model, "trace_rate")[0]))
        return found

    def on(self, model: str) -> bool:
        return self._decided(model)[0]

    def sampled(self, model: str, draw: float) -> bool:
        """Whether a request of `model` without a client's sampled trace is traced; `draw` in [0, 1)."""
        if draw * self._decided(model)[1] >= 1.0:
            return False
        scope = model if "trace_count" in self.models.get(model, {}) else ""
        if scope not in self.left:
            return True
        if self.left[scope] <= 0:
            return False
        self.left[scope] -= 1
        return True

    async def view(self, model: str) -> dict[str, list[str]]:
        return {key: list(self.value(model, key)) for key in KEYS}

    async def update(self, model: str, given: dict[str, list[str]]) -> dict[str, list[str]]:
        """Apply `given` (key -> values; an empty list clears a model's own value) and return the
        settings in force; InvalidInput naming the key and value that cannot be."""
        checked = {key: _checked(key, values, model, self.exporting) for key, values in given.items()}
        self.decided.clear()
        target = self.models.setdefault(model, {}) if model else self.server
        for key, values in checked.items():
            if values:
                target[key] = values
            elif model:
                target.pop(key, None)
            if key == "trace_count":
                self._count(model, values)
        return await self.view(model)

    def _count(self, model: str, values: list[str]) -> None:
        count = int(values[0]) if values else -1
        if count < 0:
            self.left.pop(model, None)
        else:
            self.left[model] = count


def rate_of(share: float) -> int:
    """A share of requests as Triton's rate, one in N."""
    return max(1, round(1 / share)) if share > 0 else 2**31 - 1


def _checked(key: str, values: list[str], model: str, exporting: bool) -> list[str]:
    where = f"trace setting '{shown(key)}'" + (f" of model '{shown(model)}'" if model else "")
    if key not in KEYS:
        raise InvalidInput(f"unknown trace setting '{shown(key)}'; the settings are {list(KEYS)}")
    if not values:
        if not model:
            raise InvalidInput(f"{where}: the server's settings cannot be cleared, only set")
        return []
    if len(values) != 1:
        raise InvalidInput(f"{where}: one value, not {len(values)}")
    value = values[0].strip()
    if key == "trace_level":
        value = value.upper()
        if value not in LEVELS:
            raise InvalidInput(f"{where}: {value!r} is not one of {LEVELS}")
        if value != "OFF" and not exporting:
            raise InvalidInput(f"{where}: no exporter endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT)")
        value = "TIMESTAMPS" if value == "TENSORS" else value
    elif key in ("trace_rate", "trace_count", "log_frequency"):
        lowest = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}[key]
        if not value.lstrip("-").isdigit() or int(value) < lowest:
            raise InvalidInput(f"{where}: {value!r} is not a whole number >= {lowest}")
    elif key == "trace_mode" and value != "opentelemetry":
        raise InvalidInput(f"{where}: onnxserve traces in the opentelemetry mode only, not {value!r}")
    return [value]


def rest_settings(settings: dict[str, list[str]]) -> dict:
    """As Triton's REST API writes them: trace_level a list, the others one string each."""
    return {key: values if key == "trace_level" else (values[0] if values else "") for key, values in settings.items()}


def given_settings(body: dict) -> dict[str, list[str]]:
    """A REST body's settings as lists: a string or number is one value, null clears a model's own."""
    given = {}
    for key, value in body.items():
        if value is None:
            given[key] = []
        elif isinstance(value, list):
            given[key] = [str(item) for item in value]
        else:
            given[key] = [str(value)]
    return given
