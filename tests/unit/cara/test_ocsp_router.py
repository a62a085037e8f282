"""OCSP about every issuing CA a member serves (hapki.cara.ocsp.OcspRouter): after a rollover each certificate is
answered by its own CA's responder, a CertID of no served CA is unauthorized, garbage is malformedRequest.
Software keys and a fake status store; tests/integration/test_ca_rollover.py runs it on MariaDB and SoftHSM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hapki.cara import issuance
from hapki.cara.ca_init import delegated_certificate
from hapki.cara.ocsp import OcspResponder, OcspRouter
from hapki.cara.ports import IssuerRecord, SerialStatus
from helpers.certs import self_signed_ca

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class StatusStore:
    """Every serial is known; the ones in `revoked` (by issuer) are revoked. Records which issuer was asked."""

    def __init__(self, revoked: set[tuple[str, str]] = frozenset()) -> None:  # type: ignore[assignment]
        self.revoked, self.asked = revoked, []

    async def serial_status(self, issuer: str, serial: str) -> SerialStatus:
        self.asked.append((issuer, serial))
        return SerialStatus(known=True, revoked_at=T0 if (issuer, serial) in self.revoked else None,
                            reason="key_compromise" if (issuer, serial) in self.revoked else None)


class CA:
    """An issuing CA (the same subject for both: a rollover may keep the name; the key tells them apart) and its
    delegated responder."""

    def __init__(self, name: str, subject: str = "hapki Issuing CA") -> None:
        self.name = name
        self.cert, self.key = self_signed_ca(subject, not_before=T0 - timedelta(days=1), days=3651)
        self.responder_key = ec.generate_private_key(ec.SECP256R1())
        self.responder_cert = delegated_certificate(
            "ocsp", _name(f"{subject} OCSP Responder"), self.responder_key.public_key(), issuing_cert=self.cert,
            issuing_key=self.key, serial=issuance.random_serial(), now=T0)
        pem = self.cert.public_bytes(PEM).decode()
        self.record = IssuerRecord(name=name, cert_pem=pem, chain_pem=pem, key_id=b"ca")

    def responder(self, store: StatusStore) -> OcspResponder:
        return OcspResponder(store=store, issuer=self.record, signer_cert=self.responder_cert,  # type: ignore[arg-type]
                             signer_key=self.responder_key, validity_seconds=3600, clock=lambda: T0)

    def request(self, serial: int) -> bytes:
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder().subject_name(_name("leaf")).issuer_name(self.cert.subject)
                .public_key(leaf_key.public_key()).serial_number(serial).not_valid_before(T0)
                .not_valid_after(T0 + timedelta(days=30)).sign(self.key, hashes.SHA256()))
        return ocsp.OCSPRequestBuilder().add_certificate(leaf, self.cert, hashes.SHA256()).build().public_bytes(
            serialization.Encoding.DER)


@pytest.fixture
def two() -> tuple[CA, CA, StatusStore, OcspRouter]:
    old, new = CA("issuing-1"), CA("issuing-2")
    store = StatusStore({("issuing-1", "5eed")})
    router = OcspRouter()
    router.add(old.responder(store))
    router.add(new.responder(store))
    return old, new, store, router


async def test_each_ca_answers_for_what_it_issued_under_its_own_responder(two) -> None:
    old, new, store, router = two
    for ca, status in ((old, ocsp.OCSPCertStatus.REVOKED), (new, ocsp.OCSPCertStatus.GOOD)):
        answer = await router.respond(ca.request(0x5EED))
        response = ocsp.load_der_ocsp_response(answer.der)
        assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert response.certificate_status is status
        assert response.certificates == [ca.responder_cert]
        ca.responder_cert.public_key().verify(  # type: ignore[union-attr]
            response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    # The same serial under two CAs is two certificates: each status is read under its own issuer.
    assert store.asked == [("issuing-1", "5eed"), ("issuing-2", "5eed")]
    assert router.issuers == ["issuing-1", "issuing-2"]


async def test_a_ca_not_served_is_unauthorized_and_garbage_is_malformed(two) -> None:
    _, _, store, router = two
    stranger = CA("elsewhere")
    assert (await router.respond(stranger.request(7))).status == "unauthorized"
    assert (await router.respond(b"\x30\x03garbage")).status == "malformedRequest"
    assert store.asked == []


async def test_with_no_responder_every_request_is_unauthorized() -> None:
    answer = await OcspRouter().respond(CA("issuing-1").request(7))
    assert answer.status == "unauthorized"
    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
