"""onnxserve: serve the ONNX models of a model repository over KServe v2 gRPC."""

import asyncio
import logging
import sys

from server.app import serve
from server.config import parse_server_settings
from server.errors import ConfigError
from server.tls import check_certificates


def main() -> int:
    if sys.argv[1:2] == ["usage"]:  # `onnxserve usage PATH...`: the usage log's totals
        from server.usage import main as usage

        return usage(sys.argv[2:])
    try:
        settings = parse_server_settings(sys.argv[1:])
        check_certificates(settings)  # a bad PEM file stops the start here, before anything listens
    except ConfigError as err:
        print(f"onnxserve: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(settings))
    except ConfigError as err:  # what only start-up can check: the keys file, the usage log
        print(f"onnxserve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
