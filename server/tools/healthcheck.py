"""`onnxserve-health`: asks the server's gRPC health service, for container HEALTHCHECKs.

Exit 0 when the service answers SERVING, 1 otherwise (Docker's convention). The port
is ONNXSERVE_GRPC_PORT's, so the probe follows the server's own setting.

TLS: the probe reads the server's own ONNXSERVE_GRPC_USE_SSL, ONNXSERVE_GRPC_USE_SSL_MUTUAL,
ONNXSERVE_GRPC_SERVER_CERT and ONNXSERVE_GRPC_SERVER_KEY (a server given these as flags instead
needs them in the probe's environment too). It trusts exactly the certificate the server serves
(ONNXSERVE_GRPC_SERVER_CERT), not the CA of --grpc-root-cert, which signs client certificates and
may be another; and it asks for a name that certificate holds (its first DNS name, else its first
IP address, else its CN), since 127.0.0.1 is rarely among them. Under mutual TLS it presents the
server's own certificate and key as its client certificate: that works when --grpc-root-cert
signed the server certificate too and the certificate allows client use (no extendedKeyUsage, or
one with clientAuth). Otherwise give one that does with --client-cert and --client-key.
"""

import argparse
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass(frozen=True)
class ProbeTls:
    root: bytes  # PEM: the server's own certificate (chain)
    target_name: str  # a name the server's certificate holds
    key: bytes | None = None  # PEM client key and certificate chain, under mutual TLS
    chain: bytes | None = None

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.target_name)]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root, self.key, self.chain)


def check(address: str, service: str, timeout: float, tls: ProbeTls | None = None) -> str:
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, tls.credentials(), options=tls.options())
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def probe_tls(environ: Mapping[str, str], client_cert: str = "", client_key: str = "") -> ProbeTls | None:
    """From the server's environment; None when its gRPC port is plain text."""
    mutual = _on(environ.get("ONNXSERVE_GRPC_USE_SSL_MUTUAL", ""))
    if not (mutual or _on(environ.get("ONNXSERVE_GRPC_USE_SSL", ""))):
        return None
    server_cert = environ.get("ONNXSERVE_GRPC_SERVER_CERT", "")
    if not server_cert:
        raise ValueError("ONNXSERVE_GRPC_SERVER_CERT is not set, and the server's gRPC port uses TLS")
    tls = ProbeTls(_read(server_cert), certificate_name(server_cert))
    if not mutual:
        return tls
    key = client_key or environ.get("ONNXSERVE_GRPC_SERVER_KEY", "")
    return ProbeTls(tls.root, tls.target_name, _read(key), _read(client_cert or server_cert))


def certificate_name(path: str) -> str:
    """A name the first certificate of a PEM file holds, to ask the server for."""
    # The standard library's only decoder of a certificate file; private, but in CPython since 3.3.
    decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    alternatives = decoded.get("subjectAltName", ())
    names = [value for kind, value in alternatives if kind == "DNS"] + [
        value for kind, value in alternatives if kind == "IP Address"
    ]
    names += [value for rdn in decoded.get("subject", ()) for kind, value in rdn if kind == "commonName"]
    if not names:
        raise ValueError(f"{path}: the certificate holds no DNS name, IP address or CN to ask for")
    return names[0].replace("*.", "probe.", 1)  # a wildcard name matches any one label


def _on(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")  # config.py's reading of a boolean


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnxserve-health", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('ONNXSERVE_GRPC_PORT', '8001')}")
    parser.add_argument("--service", default="", help='"" = ready to serve (default); "liveness" = process up')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument(
        "--client-cert", default="", help="PEM: client certificate under mutual TLS (default: the server's)"
    )
    parser.add_argument("--client-key", default="", help="PEM: its private key (default: the server's)")
    args = parser.parse_args(argv)
    if bool(args.client_cert) != bool(args.client_key):
        parser.error("--client-cert and --client-key go together")
    try:
        tls = probe_tls(os.environ, args.client_cert, args.client_key)
        status = check(args.address, args.service, args.timeout, tls)
    except (OSError, ssl.SSLError, ValueError) as err:
        print(f"onnxserve-health: TLS settings: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"onnxserve-health: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"onnxserve-health: {args.address} service {args.service!r}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
