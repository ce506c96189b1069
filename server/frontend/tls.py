"""TLS of the three listeners (gRPC, REST, /metrics), and who called under mutual TLS.

Flags are Triton's (--grpc-use-ssl, --grpc-use-ssl-mutual, ...), and ours for REST and /metrics;
mutual TLS implies TLS. Certificate files are read once, at start: rotating them takes a restart.
check_certificates() parses every file before anything listens, so that a bad one stops the start
with a message naming the flag and the file (exit 2) instead of an ssl traceback later.
"""

import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import grpc

from server.config import ServerSettings
from server.errors import ConfigError

log = logging.getLogger(__name__)

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
    """For start_metrics_server: ("", "") keeps /metrics plain, its default even when gRPC and REST use TLS."""
    files = tls_files(settings, "metrics")
    return ("", "") if files is None else (files.cert, files.key)


def grpc_client_name(context: grpc.aio.ServicerContext) -> str | None:
    """The client certificate's name (mutual TLS; see common_name), or None.

    Read from the verified certificate's whole subject, x509_subject (RFC 2253, as OpenSSL prints
    it), with the parser REST uses: grpc's own x509_common_name is the first CN in certificate
    order while an RFC 4514 string starts from the last, so the two transports named different
    tenants for one certificate with two CNs. Not peer_identities(): it names the subjectAltNames
    instead when the certificate has some."""
    subjects = context.auth_context().get("x509_subject")
    return common_name(subjects[0].decode("utf-8", "replace")) if subjects else None


def http_client_name(scope: Mapping) -> str | None:
    """The client certificate's name (mutual TLS; see common_name) of an ASGI scope, or None.

    The scope's ASGI TLS extension, which server/frontend/http_tls.py adds: its client_cert_name is the
    subject's whole distinguished name (RFC 4514)."""
    tls = (scope.get("extensions") or {}).get("tls")
    name = tls.get("client_cert_name") if tls else None
    return common_name(name) if name else None


@lru_cache(maxsize=256)  # per request, but a handful of distinct clients; and one warning per subject
def common_name(distinguished_name: str) -> str | None:
    """The subject's one CN attribute of an RFC 4514 string, unescaped; None when it has none, or
    more than one. Two CNs are refused as ambiguous rather than one picked: libraries disagree on
    which one names the client (OpenSSL's lookup and grpc take the first in certificate order, an
    RFC 4514 reader the last), so any pick would be one some other component does not share."""
    found = []
    for attribute in _split(distinguished_name, ",+"):
        kind, _, value = attribute.partition("=")
        if kind.strip().upper() in ("CN", "2.5.4.3"):
            found.append(value)
    if len(found) > 1:
        log.warning(
            "a client certificate has more than one CN, so it names no one (ambiguous): subject %r", distinguished_name
        )
        return None
    if not found or found[0].startswith("#"):  # "#" unescaped: a hex dump of a value no string type holds
        return None
    return _unescape(found[0])


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
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def rfc4514(subject: tuple) -> str:
    """ssl's getpeercert()["subject"] (RDNs in certificate order) as an RFC 4514 string (reversed order)."""
    rdns = (
        "+".join(f"{SHORT_NAMES.get(kind, kind)}={_escape(value)}" for kind, value in rdn) for rdn in reversed(subject)
    )
    return ",".join(rdns)


def _escape(value: str) -> str:
    escaped = re.sub(r'([\\",+;<>])', r"\\\1", value).replace("\0", "\\00")
    if escaped[:1] in (" ", "#"):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped
