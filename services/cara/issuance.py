"""What the CA signs: serial numbers and the end-entity certificate built from an approved request.

Pure functions; time, randomness source and key are passed in.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hapki.contracts.errors import SigningRejected
from hapki.contracts.models import SignCertificate

# 151 random bits with the top bit of a 152-bit number set: always 19 octets in DER (positive, <= 20 octets),
# well above the 64 bits of CSPRNG output CA/Browser Forum requires, and a fixed-width hex form.
SERIAL_RANDOM_BITS = 151
SERIAL_HEX_DIGITS = 38

EKU = {"server_auth": ExtendedKeyUsageOID.SERVER_AUTH, "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH}
KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


@dataclass(frozen=True)
class Distribution:
    """Where relying parties find revocation status: CRL distribution point and AIA OCSP URL."""

    crl_url: str
    ocsp_url: str

    @classmethod
    def at(cls, public_url: str | None, issuer: str) -> Distribution | None:
        """The URLs under the CARA VIP's public base URL (None: the certificates carry neither extension)."""
        if public_url is None:
            return None
        base = public_url.rstrip("/")
        return cls(crl_url=f"{base}/crl/{issuer}.crl", ocsp_url=f"{base}/ocsp")


def random_serial() -> int:
    """A fresh positive serial from the CSPRNG."""
    return (1 << SERIAL_RANDOM_BITS) | secrets.randbits(SERIAL_RANDOM_BITS)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def parse_csr(request: SignCertificate) -> x509.CertificateSigningRequest:
    """Re-parse and re-verify the CSR CLM approved (the CA never trusts the bus blindly)."""
    try:
        csr = x509.load_pem_x509_csr(request.csr_pem.encode())
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise SigningRejected(f"CSR does not parse: {exc}", {"request_id": request.request_id}) from None
    if not valid:
        raise SigningRejected("CSR self-signature does not verify", {"request_id": request.request_id})
    return csr


def _hash_for(issuer_key: ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if issuer_key.curve.key_size >= 384 else hashes.SHA256()


def build_certificate(
    request: SignCertificate,
    csr: x509.CertificateSigningRequest,
    *,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    now: datetime,
    backdate: timedelta,
    distribution: Distribution | None = None,
) -> x509.Certificate:
    """Build and sign (through `issuer_key`, i.e. the HSM) the end-entity certificate for an approved request."""
    not_before = now - backdate
    not_after = not_before + timedelta(seconds=request.validity_seconds)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)] if request.common_name else [])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in request.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in request.ip_addresses]
    sans += [x509.RFC822Name(e) for e in request.emails]
    if not sans:
        raise SigningRejected("approved request carries no names", {"request_id": request.request_id})
    usage = {bit: bit in request.key_usage for bit in KEY_USAGE_BITS}
    unknown = set(request.key_usage) - set(KEY_USAGE_BITS) | set(request.extended_key_usage) - set(EKU)
    if unknown:
        raise SigningRejected(f"unknown usages {sorted(unknown)}", {"request_id": request.request_id})
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    public_key = csr.public_key()  # parsed once: about 18 us a call
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([EKU[e] for e in request.extended_key_usage]), critical=False)
        # RFC 5280 4.2.1.6: SAN is critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not request.common_name)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )
    if distribution is not None:
        builder = builder.add_extension(
            x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(distribution.crl_url)], relative_name=None, reasons=None,
                crl_issuer=None)]),
            critical=False,
        ).add_extension(
            x509.AuthorityInformationAccess([x509.AccessDescription(
                x509.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(distribution.ocsp_url))]),
            critical=False,
        )
    return builder.sign(issuer_key, _hash_for(issuer_key))
