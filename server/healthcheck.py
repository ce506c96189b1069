"""`onnxserve-health`: asks the server's gRPC health service, for container HEALTHCHECKs.

Exit 0 when the service answers SERVING, 1 otherwise (Docker's convention). The port
is ONNXSERVE_GRPC_PORT's, so the probe follows the server's own setting.
"""

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout: float) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnxserve-health", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('ONNXSERVE_GRPC_PORT', '8001')}")
    parser.add_argument("--service", default="", help='"" = ready to serve (default); "liveness" = process up')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"onnxserve-health: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"onnxserve-health: {args.address} service {args.service!r}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
