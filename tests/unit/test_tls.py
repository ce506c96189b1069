"""server/frontend/tls.py without a server: the start-up check of PEM files and its messages, the TLS
arguments each listener gets, and reading a client's name out of a distinguished name, the same
from gRPC's reading of a certificate as from REST's."""

import ssl
import subprocess

import grpc
import pytest

from server.config import parse_server_settings
from server.errors import ConfigError
from server.frontend.connection_limits import LimitedHttpToolsProtocol
from server.frontend.http_tls import TlsHttpToolsProtocol, uvicorn_tls
from server.frontend.tls import (
    check_certificates,
    common_name,
    grpc_client_name,
    grpc_credentials,
    http_client_name,
    metrics_cert_and_key,
    rfc4514,
)
from tests.certificates import make_certificates, make_leaf, openssl


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def settings(tmp_path):
    def parse(*flags: str):
        return parse_server_settings(["--model-repository", str(tmp_path), *flags], {})

    return parse


def mutual_grpc(certs, cert=None, key=None, root=None) -> list[str]:
    return [
        "--grpc-use-ssl-mutual",
        "true",
        "--grpc-server-cert",
        str(cert or certs.server.cert),
        "--grpc-server-key",
        str(key or certs.server.key),
        "--grpc-root-cert",
        str(root or certs.ca.cert),
    ]


def test_good_files_pass_for_every_endpoint(certs, settings):
    server = [str(certs.server.cert), str(certs.server.key)]
    parsed = settings(
        *mutual_grpc(certs),
        "--http-use-ssl",
        "true",
        "--http-server-cert",
        server[0],
        "--http-server-key",
        server[1],
        "--metrics-use-ssl",
        "true",
        "--metrics-server-cert",
        server[0],
        "--metrics-server-key",
        server[1],
    )
    check_certificates(parsed)
    assert isinstance(grpc_credentials(parsed), grpc.ServerCredentials)
    assert metrics_cert_and_key(parsed) == tuple(server)
    assert uvicorn_tls(parsed) == {"http": TlsHttpToolsProtocol, "ssl_certfile": server[0], "ssl_keyfile": server[1]}


def test_plain_text_is_the_default_everywhere(settings):
    parsed = settings()
    check_certificates(parsed)
    assert grpc_credentials(parsed) is None
    assert metrics_cert_and_key(parsed) == ("", "")
    assert uvicorn_tls(parsed) == {
        "http": LimitedHttpToolsProtocol
    }  # no TLS extension: nothing more per request than the limits


def test_mutual_http_requires_a_client_certificate_signed_by_the_root(certs, settings):
    parsed = settings(
        "--http-use-ssl-mutual",
        "1",
        "--http-server-cert",
        str(certs.server.cert),
        "--http-server-key",
        str(certs.server.key),
        "--http-root-cert",
        str(certs.ca.cert),
    )
    options = uvicorn_tls(parsed)
    assert (options["ssl_cert_reqs"], options["ssl_ca_certs"]) == (ssl.CERT_REQUIRED, str(certs.ca.cert))


def test_a_file_without_a_certificate_names_the_flag_and_the_file(certs, settings, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as raised:
        check_certificates(settings(*mutual_grpc(certs, cert=garbage)))
    assert str(raised.value).startswith(f"--grpc-server-cert: {garbage}: no PEM certificate in it (ssl: [X509: ")
    with pytest.raises(ConfigError, match=f"^--grpc-server-cert: {certs.server.key}: no PEM certificate in it"):
        check_certificates(settings(*mutual_grpc(certs, cert=certs.server.key)))  # a key where the certificate goes


def test_a_key_that_does_not_match_the_certificate(certs, settings):
    with pytest.raises(ConfigError) as raised:
        check_certificates(settings(*mutual_grpc(certs, key=certs.client.key)))
    assert str(raised.value) == (
        f"--grpc-server-key: {certs.client.key} does not match --grpc-server-cert {certs.server.cert}: "
        "ssl: [X509: KEY_VALUES_MISMATCH] key values mismatch"
    )


def test_a_file_without_a_key(certs, settings):
    flags = [
        "--http-use-ssl",
        "yes",
        "--http-server-cert",
        str(certs.server.cert),
        "--http-server-key",
        str(certs.ca.cert),
    ]
    with pytest.raises(ConfigError, match=f"^--http-server-key: {certs.ca.cert}: no PEM private key in it \\(ssl: "):
        check_certificates(settings(*flags))


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(certs, settings, tmp_path):
    encrypted = tmp_path / "encrypted.key"
    openssl("pkey", "-in", str(certs.server.key), "-aes128", "-passout", "pass:secret", "-out", str(encrypted))
    flags = [
        "--metrics-use-ssl",
        "on",
        "--metrics-server-cert",
        str(certs.server.cert),
        "--metrics-server-key",
        str(encrypted),
    ]
    with pytest.raises(ConfigError, match=f"^--metrics-server-key: {encrypted}: the key is encrypted"):
        check_certificates(settings(*flags))


def test_a_root_file_without_a_certificate(certs, settings):
    with pytest.raises(ConfigError, match=f"^--grpc-root-cert: {certs.ca.key}: no PEM certificate in it"):
        check_certificates(settings(*mutual_grpc(certs, root=certs.ca.key)))


def test_the_root_is_read_only_under_mutual_tls(certs, settings):
    flags = [
        "--grpc-use-ssl",
        "true",
        "--grpc-server-cert",
        str(certs.server.cert),
        "--grpc-server-key",
        str(certs.server.key),
    ]
    check_certificates(settings(*flags, "--grpc-root-cert", str(certs.ca.key)))  # TLS alone: no client certificates


def test_a_missing_root_under_mutual_tls_names_the_flags(certs, settings):
    flags = mutual_grpc(certs)[:-2]
    with pytest.raises(ConfigError, match="^--grpc-root-cert: needed by --grpc-use-ssl-mutual"):
        settings(*flags)


SUBJECT = ((("countryName", "DE"),), (("organizationName", "A, B"),), (("commonName", "team+a"),))


def test_distinguished_names_round_trip_their_escapes():
    assert rfc4514(SUBJECT) == "CN=team\\+a,O=A\\, B,C=DE"
    assert common_name(rfc4514(SUBJECT)) == "team+a"
    assert common_name("CN=caf\\C3\\A9,O=x") == "café"
    assert common_name("O=x\\,CN=y,C=DE") is None
    assert common_name("UID=7+CN=team-b,O=x") == "team-b"  # a multi-valued RDN
    edges = rfc4514(((("commonName", "#lead "),),))
    assert edges == "CN=\\#lead\\ " and common_name(edges) == "#lead "  # a leading # and a trailing space


def test_http_client_name_reads_the_asgi_tls_extension():
    assert http_client_name({"type": "http"}) is None  # plain HTTP: no extension at all
    assert http_client_name({"extensions": {"tls": {"client_cert_name": None}}}) is None  # TLS, no certificate
    assert http_client_name({"extensions": {"tls": {"client_cert_name": "CN=team-a,O=Example"}}}) == "team-a"


def test_a_subject_with_two_common_names_names_no_one(caplog):
    common_name.cache_clear()  # the warning comes once per subject parsed, and other tests parse these too
    assert common_name("CN=team-second,O=acme,CN=team-first") is None  # the two orders disagree: neither is taken
    assert common_name("CN=team-b+CN=team-c,O=x") is None  # two CNs in one multi-valued RDN
    assert common_name("CN=#0c067465616d2d61,O=x") is None  # a value dumped as hex: no string to read
    assert [record.levelname for record in caplog.records] == ["WARNING", "WARNING"]
    assert "more than one CN" in caplog.records[0].getMessage()
    common_name("CN=team-second,O=acme,CN=team-first")
    assert len(caplog.records) == 2, "one warning per distinct subject, not per call"


class AuthContext:
    """What grpc.aio's ServicerContext.auth_context() gives under mutual TLS, as far as it is read."""

    def __init__(self, subject: str) -> None:
        self.properties = {"x509_subject": [subject.encode()], "x509_common_name": [b"not-read"]}

    def auth_context(self) -> dict:
        return self.properties


@pytest.mark.parametrize(
    "subject, expected",
    [
        ("team-a", "team-a"),
        ("Müller, GmbH\\+1", "Müller, GmbH+1"),  # OpenSSL escapes the bytes of ü (\C3\BC), Python keeps it
        ("\\#lead", "#lead"),
        ("x=y;z", "x=y;z"),
        ('q"uote<> ', 'q"uote<> '),  # a trailing space
        ("tab\there", "tab\there"),  # OpenSSL writes \09
        ("team-first/O=acme/CN=team-second", None),
    ],
)
def test_grpc_and_rest_read_one_certificate_alike(certs, tmp_path, subject, expected):
    """gRPC gets the subject as OpenSSL prints it (RFC 2253), REST as Python's ssl parses it: one name."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # CPython's own tests read certificates with it
    if decode is None:
        pytest.skip("this Python has no ssl._ssl._test_decode_cert")
    pair = make_leaf(tmp_path, "subject", certs.ca, subject)
    printed = subprocess.run(
        ["openssl", "x509", "-in", str(pair.cert), "-noout", "-subject", "-nameopt", "RFC2253"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    over_grpc = grpc_client_name(AuthContext(printed.rstrip("\n").removeprefix("subject=")))
    over_rest = http_client_name(
        {"extensions": {"tls": {"client_cert_name": rfc4514(decode(str(pair.cert))["subject"])}}}
    )
    assert over_grpc == over_rest == expected
