"""A fleet's certificates for mutual TLS (the `cryptography` library): one CA, a certificate per broker, device
and coordinator. The broker (mosquitto with `require_certificate` + `use_identity_as_username`) takes a client
certificate's common name as its MQTT username, so the generated ACL's `%u` is the device id.

Files in the PKI folder: `ca.crt`, `ca.key` (0600), and `{name}.crt`, `{name}.key` (0600) per issued name.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgelearn.atomic import write_bytes
from edgelearn.protocol import NAME_RE

CA_DAYS = 3650
CERT_DAYS = 825  # what browsers and most TLS stacks still accept for a leaf
CA = "ca"


class PkiError(ValueError):
    """A PKI folder or name that cannot be used as asked (missing CA, CA already there, bad name)."""


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def _save(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_bytes(folder / f"{name}.key", _key_bytes(key))
    (folder / f"{name}.key").chmod(0o600)
    write_bytes(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.crt").chmod(0o644)  # public


def _builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def init_ca(folder: Path, fleet: str) -> Path:
    """Make the fleet's CA in `folder` (refuses to replace one); returns the path of `ca.crt`."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f"{CA}.key").exists():
        raise PkiError(f"{folder} already holds a CA ({CA}.key); issue certificates with it or choose a new folder")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgelearn fleet {fleet} CA")])
    cert = (
        _builder(f"edgelearn fleet {fleet} CA", name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _save(folder, CA, cert, key)
    return folder / f"{CA}.crt"


def issue(folder: Path, name: str, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A certificate with common name `name` (a device id, `coordinator`, or a broker's name) signed by the CA in
    `folder`; `hosts` (DNS names or IP addresses) make it a server certificate. Returns (cert, key) paths."""
    if not NAME_RE.match(name) or name == CA:
        raise PkiError(f"name {name!r}: 1–64 letters, digits, '-' or '_' (not {CA!r})")
    try:
        ca_key = serialization.load_pem_private_key((folder / f"{CA}.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((folder / f"{CA}.crt").read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{folder} holds no CA: run `edgelearn pki init --dir {folder}` first") from None
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        _builder(name, ca_cert.subject, key.public_key(), CERT_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    _save(folder, name, b.sign(ca_key, hashes.SHA256()), key)
    return folder / f"{name}.crt", folder / f"{name}.key"


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
