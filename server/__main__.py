"""onnxserve: serve the ONNX models of a model repository over KServe v2 gRPC."""

import asyncio
import logging
import sys

from server.app import serve
from server.config import parse_server_settings
from server.errors import ConfigError


def main() -> int:
    try:
        settings = parse_server_settings(sys.argv[1:])
    except ConfigError as err:
        print(f"onnxserve: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
