"""Test certificates made with the openssl CLI: two CAs, a server certificate for localhost and
127.0.0.1, and client certificates. EC P-256 keys, valid for two days: fast, and never reused."""

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# Our own minimal configuration: the system's openssl.cnf would add extensions of its own.
CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Pair
    server: Pair  # signed by ca; DNS:localhost, IP:127.0.0.1; no extendedKeyUsage, so a client may present it
    client: Pair  # CN=team-a, signed by ca
    other_ca: Pair
    stranger: Pair  # CN=team-a too, but signed by other_ca


def openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI (Debian package openssl)")
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def make_ca(directory: Path, name: str) -> Pair:
    config = _config(directory)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    openssl(
        "req",
        "-x509",
        "-config",
        str(config),
        "-extensions",
        "ca",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(pair.key),
        "-out",
        str(pair.cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    return pair


def make_leaf(directory: Path, name: str, ca: Pair, common_name: str, extra: str = "") -> Pair:
    """A certificate for common_name (UTF-8; openssl's -subj syntax, so "a/O=b/CN=c" makes a subject
    of three attributes) signed by ca; extra: more extension lines (subjectAltName = ...)."""
    config = _config(directory)
    extensions = directory / f"{name}.ext"
    extensions.write_text(CONFIG.split("[leaf]\n")[1] + extra)
    pair, request = Pair(directory / f"{name}.pem", directory / f"{name}.key"), directory / f"{name}.csr"
    openssl(
        "req",
        "-new",
        "-config",
        str(config),
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(pair.key),
        "-out",
        str(request),
        "-utf8",
        "-subj",
        f"/CN={common_name}",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-set_serial",
        str(secrets.randbits(62) + 1),
        "-days",
        "2",
        "-extfile",
        str(extensions),
        "-out",
        str(pair.cert),
    )
    return pair


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other_ca = make_ca(directory, "ca"), make_ca(directory, "other-ca")
    return Certificates(
        ca=ca,
        server=make_leaf(directory, "server", ca, "onnxserve", "subjectAltName = DNS:localhost,IP:127.0.0.1\n"),
        client=make_leaf(directory, "client", ca, "team-a"),
        other_ca=other_ca,
        stranger=make_leaf(directory, "stranger", other_ca, "team-a"),
    )


def _config(directory: Path) -> Path:
    path = directory / "openssl.cnf"
    if not path.exists():
        path.write_text(CONFIG)
    return path
