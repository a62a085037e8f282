"""Certificate building and serials, with a software issuer key (the HSM is tested in integration)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hapki.cara import issuance
from hapki.contracts.errors import SigningRejected
from hapki.contracts.models import SignCertificate
from helpers.csr import make_csr, make_key

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _issuer() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuing CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _request(**overrides: object) -> SignCertificate:
    csr_pem, _ = make_csr(["a.example.com"], key=make_key("p256"), cn="a.example.com")
    fields = dict(request_id=uuid.uuid4().hex, profile="tls-server", csr_pem=csr_pem, common_name="a.example.com",
                  dns_names=["a.example.com"], ip_addresses=["192.0.2.7"], validity_seconds=86400,
                  key_usage=["digital_signature"], extended_key_usage=["server_auth"])
    fields.update(overrides)
    return SignCertificate(**fields)


def test_serials_are_positive_fixed_width_and_random() -> None:
    serials = [issuance.random_serial() for _ in range(2000)]
    assert len(set(serials)) == len(serials)
    for s in serials:
        assert s > 0 and s.bit_length() == issuance.SERIAL_RANDOM_BITS + 1
        assert len(issuance.serial_hex(s)) == issuance.SERIAL_HEX_DIGITS
        assert (s.bit_length() + 8) // 8 <= 20  # DER INTEGER content octets
    # every one of the 151 random bits varies across the sample
    varying = 0
    for bit in range(issuance.SERIAL_RANDOM_BITS):
        ones = sum((s >> bit) & 1 for s in serials)
        varying += 0 < ones < len(serials)
    assert varying == issuance.SERIAL_RANDOM_BITS


def test_certificate_carries_exactly_what_was_approved() -> None:
    issuer_cert, issuer_key = _issuer()
    request = _request()
    cert = issuance.build_certificate(request, issuance.parse_csr(request), issuer_cert=issuer_cert,
                                      issuer_key=issuer_key, serial=12345, now=NOW, backdate=timedelta(seconds=60))
    assert cert.serial_number == 12345
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=60)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(seconds=86400)
    assert cert.issuer == issuer_cert.subject
    cert.verify_directly_issued_by(issuer_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["a.example.com"]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_empty_subject_makes_san_critical() -> None:
    issuer_cert, issuer_key = _issuer()
    request = _request(common_name=None)
    cert = issuance.build_certificate(request, issuance.parse_csr(request), issuer_cert=issuer_cert,
                                      issuer_key=issuer_key, serial=7, now=NOW, backdate=timedelta(0))
    assert len(cert.subject) == 0
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


@pytest.mark.parametrize("overrides", [
    {"csr_pem": "not a csr"},
    {"dns_names": [], "ip_addresses": [], "emails": []},
    {"key_usage": ["key_cert_sign_typo"]},
    {"extended_key_usage": ["code_signing"]},
])
def test_the_ca_refuses_what_it_cannot_sign_safely(overrides: dict) -> None:
    issuer_cert, issuer_key = _issuer()
    request = _request(**overrides)
    with pytest.raises(SigningRejected):
        issuance.build_certificate(request, issuance.parse_csr(request), issuer_cert=issuer_cert,
                                   issuer_key=issuer_key, serial=1, now=NOW, backdate=timedelta(0))
