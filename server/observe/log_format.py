"""How log lines look: text (the default), or with --log-format json one JSON object a line, for
log pipelines, carrying the trace and span ids of the request a line was written for, where that
request is traced (server/observe/tracing.py sets them as it starts the request's span)."""

import contextvars
import logging
import time

import orjson

# (trace id, span id) in hex of the traced request the running task serves
request_trace: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("request_trace", default=None)


class JsonLines(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role  # "", "engine" or "frontend N"

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.role:
            entry["process"] = self.role
        trace = request_trace.get()
        if trace is not None:
            entry["trace_id"], entry["span_id"] = trace
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(level: str, log_format: str, role: str) -> None:
    """The root logger's one handler, on stderr, as the format says; `role` names the process."""
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLines(role))
        logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
        return
    prefix = f"{role} " if role else ""
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", force=True
    )
