"""onnxserve: serve the ONNX models of a model repository over KServe v2 gRPC."""

import asyncio
import dataclasses
import logging
import os
import sys

from server.app import serve
from server.config import parse_server_settings
from server.engine import cuda_libraries
from server.engine.cpus import cpu_cores
from server.engine.placement import visible_gpus
from server.errors import ConfigError
from server.frontend.tls import check_certificates
from server.frontends import frontend_count
from server.observe import log_format, nvml_devices


def main() -> int:
    if sys.argv[1:2] == ["usage"]:  # `onnxserve usage PATH...`: the usage log's totals
        from server.tools.usage import main as usage

        return usage(sys.argv[2:])
    try:
        settings = parse_server_settings(sys.argv[1:])
        settings = dataclasses.replace(settings, frontends=frontend_count(settings.frontends, cpu_cores()))
        check_certificates(settings)  # a bad PEM file stops the start here, before anything listens
    except ConfigError as err:
        print(f"onnxserve: {err}", file=sys.stderr)
        return 2
    role = "engine" if settings.frontends > 1 else ""  # the front ends' lines say "frontend N"
    log_format.configure(settings.log_level, settings.log_format, role)
    prepare_gpus()
    try:
        return asyncio.run(serve(settings))
    except ConfigError as err:  # what only start-up can check: the keys file, the usage log
        print(f"onnxserve: {err}", file=sys.stderr)
        return 2


def prepare_gpus() -> None:
    """Before any session opens: CUDA numbers GPUs in NVML's (PCI bus) order, so that cuda:N's
    energy and price are read from the right board; NVIDIA's pip-installed libraries loaded where
    onnxruntime's GPU providers find them (a few tenths of a second, once)."""
    log = logging.getLogger("onnxserve")
    if warning := nvml_devices.pin_cuda_order(os.environ):
        log.warning("%s", warning)
    missing = cuda_libraries.preload()
    if missing:
        gpus = visible_gpus()
        log.log(
            logging.WARNING if gpus else logging.INFO,
            "CUDA libraries: %d could not be loaded (%s); for GPU execution install them with "
            "pip install 'onnxserve[cuda]'",
            len(missing),
            "; ".join(missing[:3]),
        )


if __name__ == "__main__":
    sys.exit(main())
