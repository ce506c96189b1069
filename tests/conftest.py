"""Fixtures: a real onnxserve process on loopback ports (bench/serving.py), stopped after each test."""

from pathlib import Path

import pytest

from bench.serving import (
    HTTP_LINE,
    LISTENING_LINE,
    NOT_READY_LINE,
    READY_LINE,
    ROOT,
    ServerProcess,
    start_server,
    wait_until,
)
from server.tools.metrics_reader import Samples, parse_samples

__all__ = [  # the tests import these from here
    "HTTP_LINE",
    "LISTENING_LINE",
    "NOT_READY_LINE",
    "READY_LINE",
    "ROOT",
    "Samples",
    "ServerProcess",
    "parse_samples",
    "start_server",
    "wait_until",
]


@pytest.fixture
def serve(tmp_path):
    """serve(repository, *flags) -> ServerProcess; every server is stopped after the test."""
    started: list[ServerProcess] = []

    def _serve(repository: Path, *extra: str, **kwargs) -> ServerProcess:
        server = start_server(repository, *extra, **kwargs)
        started.append(server)
        return server

    yield _serve
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
        server.wait(10)
