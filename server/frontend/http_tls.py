"""REST over TLS: uvicorn's TLS arguments, and a protocol that tells the app who called.

uvicorn's httptools protocol puts nothing of TLS into the ASGI scope. TlsHttpToolsProtocol adds the
ASGI TLS extension (scope["extensions"]["tls"]), built once per connection from the peer
certificate; server.frontend.tls.http_client_name reads the caller's name from it. Plain HTTP keeps the
protocol it derives from, LimitedHttpToolsProtocol (server/frontend/connection_limits.py: bounds on each
request and connection), so that it does nothing more per request than that.
"""

import ssl
from typing import Any

from server.config import ServerSettings
from server.frontend.connection_limits import LimitedHttpToolsProtocol
from server.frontend.tls import rfc4514, tls_files

TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsHttpToolsProtocol(LimitedHttpToolsProtocol):
    """The limited httptools protocol, plus the ASGI TLS extension in every request's scope."""

    tls_extension: dict | None = None

    def connection_ready(self, transport) -> None:
        # called after the handshake: the peer's certificate is known by now, and before the
        # request bytes that came with the handshake's end are parsed
        self.tls_extension = tls_extension(transport.get_extra_info("ssl_object"))
        super().connection_ready(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()  # builds a fresh scope for each request of the connection
        if self.tls_extension is not None:
            self.scope["extensions"] = {"tls": self.tls_extension}  # type: ignore[typeddict-unknown-key]


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict | None:
    """The ASGI TLS extension's fields (asgi.readthedocs.io, "TLS"); None on a plain connection."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)  # None unless the client sent a certificate
    subject = ssl_object.getpeercert().get("subject", ()) if der else ()
    return {
        "server_cert": None,  # allowed: Python's ssl does not hand back the server's own certificate
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": rfc4514(subject) if der else None,
        "client_cert_error": None,  # a certificate that fails verification ends the handshake: no request
        "tls_version": TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # Python's ssl names the suite but does not give its number
    }


def uvicorn_tls(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn.Config's protocol and TLS arguments for --http-use-ssl[-mutual]."""
    files = tls_files(settings, "http")
    if files is None:
        return {"http": LimitedHttpToolsProtocol}
    options: dict[str, Any] = {"http": TlsHttpToolsProtocol, "ssl_certfile": files.cert, "ssl_keyfile": files.key}
    if files.mutual:
        options.update(ssl_ca_certs=files.root, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
