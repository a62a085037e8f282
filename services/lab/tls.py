"""TLS material for the lab's haproxy: a software infrastructure CA and haproxy-ready server PEM files.

The infrastructure CA signs the platform's own TLS endpoints only. It is NOT the hapki CA (whose keys live in
the HSM) and never signs what clients request. Files are reused while present and still fit for purpose, so
the lab can call these on every start.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hapki.runtime.clock import utcnow

CA_NAME = "hapki lab infrastructure CA"
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=397)
# A server certificate this close to its end is issued again rather than reused.
RENEW_BEFORE = timedelta(days=30)
BACKDATE = timedelta(minutes=5)


class InfraCA(NamedTuple):
    """Paths of the infrastructure CA's certificate and private key (PEM; the key file is 0600)."""

    cert_path: Path
    key_path: Path


def create_infra_ca(directory: Path, *, now: datetime | None = None) -> InfraCA:
    """The infrastructure CA in `directory` (infra-ca.pem, infra-ca.key): P-256, 10 years; reused if valid."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = now or utcnow()
    ca = InfraCA(directory / "infra-ca.pem", directory / "infra-ca.key")
    if _ca_usable(ca, now):
        return ca
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_file(ca.key_path, _key_pem(key))
    _write_file(ca.cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return ca


def issue_server_cert(
    ca: InfraCA, directory: Path, name: str, ips: list[str], dns: list[str], *, now: datetime | None = None,
    client_auth: bool = False,
) -> Path:
    """`directory/<name>.pem`: certificate, CA chain and key in one 0600 file, as haproxy's `crt` wants it.

    Reused while it is signed by `ca`, carries exactly these names and is not within RENEW_BEFORE of its end.
    `client_auth`: also for TLS clients (cluster members that dial each other: NATS routes, Galera replication).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = now or utcnow()
    path = directory / f"{name}.pem"
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    sans = [*(x509.DNSName(d) for d in dns), *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])]
    if _server_usable(path, ca_cert, sans, now, usages):
        return path
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = b"".join([cert.public_bytes(serialization.Encoding.PEM), ca.cert_path.read_bytes(), _key_pem(key)])
    _write_file(path, pem)
    return path


def _ca_usable(ca: InfraCA, now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
        key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    return key.public_key() == cert.public_key() and cert.not_valid_after_utc > now + RENEW_BEFORE


def _server_usable(path: Path, ca_cert: x509.Certificate, sans: list[x509.GeneralName], now: datetime,
                   usages: list[x509.ObjectIdentifier]) -> bool:
    try:
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)  # the first certificate in the file: the leaf
        key = serialization.load_pem_private_key(_key_block(pem), password=None)
        cert.verify_directly_issued_by(ca_cert)
        present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        key.public_key() == cert.public_key()
        and set(present) == set(sans)
        and set(eku) == set(usages)
        and cert.not_valid_after_utc > now + RENEW_BEFORE
    )


def _key_block(pem: bytes) -> bytes:
    start = pem.find(b"-----BEGIN PRIVATE KEY-----")
    if start < 0:
        raise ValueError("no private key in the file")
    return pem[start:]


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically, the file never readable by others even for a moment."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    tmp.replace(path)
