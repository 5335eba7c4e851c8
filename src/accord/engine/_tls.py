"""A cluster's own PKI for `accord up --tls` and `accord server config --tls`: a CA, and server
certificates it signs for the given host names and addresses (the `cryptography` package).

Keys are written 0600 next to the CA in the state directory; clients verify the server against
`ca.pem` (see `_auth.Credentials`). The certificates carry what strict RFC 5280 verification
requires (key identifiers, key usage): Python 3.13's default client context checks it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._auth import write_private

VALID_DAYS = 825  # the longest validity clients accept for a server certificate


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files a server (and, with `ca`, its clients) needs."""

    ca: Path
    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


#: An ECDSA leaf signs the handshake (TLS 1.3) and agrees keys (ECDH suites of TLS 1.2).
_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, key_agreement=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
    decipher_only=False,
)  # fmt: skip


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The issuer's key identifier: its own SubjectKeyIdentifier, else one derived from its key
    (a CA made before accord wrote one)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ensure_ca(directory: Path, cluster: str = "accord") -> tuple[Path, Path]:
    """The CA certificate and key in `directory`, created once (reused when present)."""
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        _add_key_identifier(cert_path, key_path)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{cluster} accord CA"))
        .issuer_name(_name(f"{cluster} accord CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)  # the CA certificate is public: clients on other machines need it
    return cert_path, key_path


def _add_key_identifier(cert_path: Path, key_path: Path) -> None:
    """Re-sign a CA made before accord gave it a SubjectKeyIdentifier (strict verification, as
    Python 3.13's clients do it, refuses it): same key, subject and validity, so what it signed
    still verifies. An unreadable CA is left alone (the server's start reports it)."""
    try:
        ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return
    except x509.ExtensionNotFound:
        pass
    except (OSError, ValueError):
        return
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return
    if not isinstance(key, ec.EllipticCurvePrivateKey) or ca.subject != ca.issuer:
        return
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
    )
    for ext in ca.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    write_private(
        cert_path, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    cert_path.chmod(0o644)


def issue_cert(directory: Path, name: str, hosts: list[str], *, client: bool = False) -> TlsFiles:
    """A certificate `<name>.pem` (+ `<name>-key.pem`) signed by the CA of `directory` for
    `hosts` (DNS names or IP addresses); server and, with `client`, client authentication."""
    ca_cert_path, ca_key_path = ensure_ca(directory)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usages = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    if client:
        usages.append(x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(ca_cert_path, cert_path, key_path)
