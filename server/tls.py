"""TLS of the three listeners (gRPC, REST, /metrics), and who called under mutual TLS.

Flags are Triton's (--grpc-use-ssl, --grpc-use-ssl-mutual, ...), and ours for REST and /metrics;
mutual TLS implies TLS. Certificate files are read once, at start: rotating them takes a restart.
check_certificates() parses every file before anything listens, so that a bad one stops the start
with a message naming the flag and the file (exit 2) instead of an ssl traceback later.
"""

import re
import socket
import ssl
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client.exposition import ThreadingWSGIServer

from server.config import ServerSettings
from server.errors import ConfigError

ENDPOINTS = ("grpc", "http", "metrics")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one endpoint that serves TLS; root is set only under mutual TLS."""

    endpoint: str  # grpc, http or metrics
    cert: str
    key: str
    root: str = ""

    @property
    def mutual(self) -> bool:
        return bool(self.root)

    def flag(self, name: str) -> str:
        return f"--{self.endpoint}-{name}"


def tls_files(settings: ServerSettings, endpoint: str) -> TlsFiles | None:
    """None when the endpoint serves plain text. config.py has checked the files are given and readable."""
    mutual = getattr(settings, f"{endpoint}_use_ssl_mutual", False)  # /metrics has no mutual TLS
    if not (mutual or getattr(settings, f"{endpoint}_use_ssl")):
        return None
    cert, key = getattr(settings, f"{endpoint}_server_cert"), getattr(settings, f"{endpoint}_server_key")
    return TlsFiles(endpoint, cert, key, getattr(settings, f"{endpoint}_root_cert") if mutual else "")


def describe(files: TlsFiles | None) -> str:
    """For the "listening:" log line."""
    return "" if files is None else " (mTLS)" if files.mutual else " (TLS)"


def check_certificates(settings: ServerSettings) -> None:
    """Parse every TLS file with Python's ssl, the way the listeners will, before any of them starts."""
    for endpoint in ENDPOINTS:
        if (files := tls_files(settings, endpoint)) is not None:
            _check(files)


class _Encrypted(Exception):
    """Raised from ssl's password callback: a server asks no one for a passphrase."""


def _refuse_password() -> bytes:
    raise _Encrypted


def _check(files: TlsFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _check_certificates(context, files.flag("server-cert"), files.cert)
    key_flag = files.flag("server-key")
    try:
        context.load_cert_chain(files.cert, files.key, password=_refuse_password)
    except _Encrypted:
        message = "the key is encrypted; give it unencrypted (nothing asks for a passphrase)"
        raise ConfigError(f"{key_flag}: {files.key}: {message}") from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"{key_flag}: {files.key} does not match {files.flag('server-cert')} {files.cert}: {_reason(err)}"
            ) from None
        raise ConfigError(f"{key_flag}: {files.key}: no PEM private key in it ({_reason(err)})") from None
    except OSError as err:
        raise ConfigError(f"{key_flag}: {files.key}: {err.strerror or err}") from None
    if files.mutual:
        _check_certificates(context, files.flag("root-cert"), files.root)


def _check_certificates(context: ssl.SSLContext, flag: str, path: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as err:
        raise ConfigError(f"{flag}: {path}: no PEM certificate in it ({_reason(err)})") from None
    except OSError as err:
        raise ConfigError(f"{flag}: {path}: {err.strerror or err}") from None


def _reason(err: ssl.SSLError) -> str:
    """ssl's own words, without the C source line: '[X509: KEY_VALUES_MISMATCH] key values mismatch'."""
    return "ssl: " + re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(err.strerror or err))


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def grpc_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """For server.add_secure_port; None: plain text (add_insecure_port)."""
    files = tls_files(settings, "grpc")
    if files is None:
        return None
    return grpc.ssl_server_credentials(
        [(_read(files.key), _read(files.cert))],
        root_certificates=_read(files.root) if files.mutual else None,
        require_client_auth=files.mutual,
    )


def metrics_cert_and_key(settings: ServerSettings) -> tuple[str, str]:
    """For serve_metrics: ("", "") keeps /metrics plain, its default even when gRPC and REST use TLS."""
    files = tls_files(settings, "metrics")
    return ("", "") if files is None else (files.cert, files.key)


HANDSHAKE_SECONDS = 10.0  # and then per read or write of the scrape


class _HandshakeInItsThread(ThreadingWSGIServer):
    """prometheus_client's own TLS wraps the listening socket, so that its accept loop makes every
    handshake: one client that connects and says nothing stalls every scrape (seen: a plain
    socket left open made https scrapes time out). Here each connection's thread makes its own."""

    context: ssl.SSLContext

    def finish_request(self, request, client_address) -> None:
        request.settimeout(HANDSHAKE_SECONDS)
        try:
            secure = self.context.wrap_socket(request, server_side=True)
        except OSError:  # plain HTTP, a silent client, a failed handshake: only this thread ends
            return
        with secure:
            super().finish_request(secure, client_address)


class _Silent(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # as prometheus_client's: no line per scrape
        pass


def serve_wsgi_tls(app, address: str, port: int, certfile: str, keyfile: str) -> WSGIServer:
    """A WSGI app over TLS in daemon threads, as prometheus_client's start_http_server serves one."""
    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsTlsServer", (_HandshakeInItsThread,), {"address_family": family})
    httpd = make_server(sockaddr[0], port, app, server_class, handler_class=_Silent)
    httpd.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    httpd.context.load_cert_chain(certfile, keyfile)
    threading.Thread(target=httpd.serve_forever, name="metrics-tls", daemon=True).start()
    return httpd


def grpc_client_name(context: grpc.aio.ServicerContext) -> str | None:
    """The subject Common Name of the client certificate the server verified (mutual TLS), or None.

    grpc puts x509_common_name into the auth context only for a verified client certificate; not
    peer_identities(), which names the subjectAltNames instead when the certificate has some."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


def http_client_name(scope: Mapping) -> str | None:
    """The subject Common Name of the client certificate (mutual TLS) of an ASGI scope, or None.

    The scope's ASGI TLS extension, which server/http_tls.py adds: its client_cert_name is the
    subject's whole distinguished name (RFC 4514); the first CN in it is the most specific one."""
    tls = (scope.get("extensions") or {}).get("tls")
    name = tls.get("client_cert_name") if tls else None
    return common_name(name) if name else None


@lru_cache(maxsize=256)  # per request, but a handful of distinct clients
def common_name(distinguished_name: str) -> str | None:
    """The first CN attribute of an RFC 4514 string, unescaped; None when it has none."""
    for attribute in _split(distinguished_name, ",+"):
        kind, _, value = attribute.partition("=")
        if kind.strip().upper() in ("CN", "2.5.4.3"):
            return _unescape(value)
    return None


def _split(text: str, separators: str) -> list[str]:
    """Split at separators that no backslash escapes."""
    parts, start, index = [], 0, 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] in separators:
            parts.append(text[start:index])
            start = index + 1
        index += 1
    return [*parts, text[start:]]


def _unescape(value: str) -> str:
    """RFC 4514 escapes: a backslash before a special character, or before two hex digits (a UTF-8 byte)."""
    raw, index = bytearray(), 0
    while index < len(value):
        if value[index] == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", value[index + 1 : index + 3]):
            raw.append(int(value[index + 1 : index + 3], 16))
            index += 3
        elif value[index] == "\\" and index + 1 < len(value):
            raw.extend(value[index + 1].encode())
            index += 2
        else:
            raw.extend(value[index].encode())
            index += 1
    return raw.decode("utf-8", "replace")


# RFC 4514's short names; other attributes keep Python's name for them (as OpenSSL prints them).
SHORT_NAMES = {
    "commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST", "organizationName": "O",
    "organizationalUnitName": "OU", "countryName": "C", "streetAddress": "STREET", "domainComponent": "DC",
    "userId": "UID",
}  # fmt: skip


def rfc4514(subject: tuple) -> str:
    """ssl's getpeercert()["subject"] (RDNs in certificate order) as an RFC 4514 string (reversed order)."""
    rdns = ("+".join(f"{SHORT_NAMES.get(kind, kind)}={_escape(value)}" for kind, value in rdn) for rdn in reversed(subject))
    return ",".join(rdns)


def _escape(value: str) -> str:
    escaped = re.sub(r'([\\",+;<>])', r"\\\1", value).replace("\0", "\\00")
    if escaped[:1] in (" ", "#"):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped
