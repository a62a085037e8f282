"""The OCSP responder certificate over time (hapki.cara.ocsp_signer): renewed by the active member when fewer than
`renew_before` days are left, accounted before it is signed, and used by every member once it is the newest.
Software keys and a fake store; tests/integration/test_ocsp_signer_renewal.py runs it on MariaDB and SoftHSM."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hapki.cara import issuance
from hapki.cara.ca_init import OCSP_SIGNER_VALIDITY, delegated_certificate, recertify
from hapki.cara.ocsp import OcspResponder, parse_request
from hapki.cara.ocsp_signer import OcspSignerKeeper
from hapki.cara.ports import IssuerRecord, OcspSignerRecord, SerialStatus
from hapki.contracts.errors import FencedOut

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issuing_ca(days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("Issuing")).issuer_name(_name("Issuing"))
            .public_key(key.public_key()).serial_number(1).not_valid_before(T0 - timedelta(days=1))
            .not_valid_after(T0 + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


@dataclass
class FakeStore:
    rows: list[OcspSignerRecord] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (what, serial, epoch)
    epoch: int = 7  # the current epoch: writes under another are fenced out

    async def ocsp_signer(self, issuer: str) -> OcspSignerRecord | None:
        return max(self.rows, key=lambda r: r.certificate.not_valid_after_utc, default=None)

    async def ocsp_signer_certifying(self, issuer: str, *, serial: str, key_id: bytes, not_after: datetime,
                                     epoch: int, member: str, now: datetime) -> str:
        if epoch != self.epoch:
            raise FencedOut("stale epoch")
        self.log.append(("certifying", serial, epoch))
        return f"intent-{serial}"

    async def save_ocsp_signer(self, record: OcspSignerRecord, *, not_after: datetime, now: datetime,
                               epoch: int | None = None, intent_id: str | None = None) -> None:
        if epoch != self.epoch:
            raise FencedOut("stale epoch")
        assert not_after == record.certificate.not_valid_after_utc
        assert intent_id == f"intent-{format(record.certificate.serial_number, 'x')}", "stored under its own intent"
        self.log.append(("created", format(record.certificate.serial_number, "x"), epoch))
        self.rows.append(record)


@dataclass
class Activity:
    active: bool = True
    epoch: int | None = 7


class Rig:
    def __init__(self, *, now: datetime, ca_days: int = 3650, active: bool = True) -> None:
        self.issuing_cert, self.issuing_key = issuing_ca(ca_days)
        self.responder_key = ec.generate_private_key(ec.SECP256R1())
        first = delegated_certificate("ocsp", _name("Issuing OCSP Responder"), self.responder_key.public_key(),
                                      issuing_cert=self.issuing_cert, issuing_key=self.issuing_key,
                                      serial=issuance.random_serial(), now=T0)
        self.issuer = IssuerRecord(name="issuing-1", cert_pem=self.issuing_cert.public_bytes(PEM).decode(),
                                   chain_pem=self.issuing_cert.public_bytes(PEM).decode(), key_id=b"ca")
        self.store = FakeStore([OcspSignerRecord("issuing-1", first.public_bytes(PEM).decode(), b"k1")])
        self.now = now
        self.activity = Activity(active=active)
        self.responder = OcspResponder(store=None, issuer=self.issuer, signer_cert=first,  # type: ignore[arg-type]
                                       signer_key=self.responder_key, validity_seconds=3600, clock=lambda: self.now)
        self.keys_asked: list[bytes] = []
        self.keeper = OcspSignerKeeper(
            store=self.store, issuer=self.issuer, issuing_key=self.issuing_key, responder=self.responder,
            signer_key=self._key, activity=self.activity, member="cara-1", renew_before=timedelta(days=30),
            check_seconds=300, clock=lambda: self.now)
        self.first = first

    def _key(self, key_id: bytes) -> ec.EllipticCurvePrivateKey:
        self.keys_asked.append(key_id)
        return self.responder_key

    def response(self) -> ocsp.OCSPResponse:
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder().subject_name(_name("leaf")).issuer_name(self.issuing_cert.subject)
                .public_key(leaf_key.public_key()).serial_number(99).not_valid_before(T0)
                .not_valid_after(T0 + timedelta(days=30)).sign(self.issuing_key, hashes.SHA256()))
        der = ocsp.OCSPRequestBuilder().add_certificate(leaf, self.issuing_cert, hashes.SHA1()).build().public_bytes(
            serialization.Encoding.DER)
        return ocsp.load_der_ocsp_response(self.responder.sign_response(parse_request(der), SerialStatus(known=True)))


def test_recertify_keeps_key_subject_and_purpose_with_a_new_serial_and_validity() -> None:
    rig = Rig(now=T0 + timedelta(days=61))
    now = rig.now
    renewed = recertify(rig.first, "ocsp", issuing_cert=rig.issuing_cert, issuing_key=rig.issuing_key, serial=1234,
                        now=now)
    renewed.verify_directly_issued_by(rig.issuing_cert)
    assert renewed.public_key() == rig.first.public_key() and renewed.subject == rig.first.subject
    assert renewed.serial_number == 1234 != rig.first.serial_number
    assert renewed.not_valid_before_utc == now - timedelta(minutes=1)
    assert renewed.not_valid_after_utc == now + OCSP_SIGNER_VALIDITY
    eku = renewed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert renewed.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert renewed.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    other_cert, other_key = issuing_ca()
    with pytest.raises(ValueError, match="was not issued by"):  # not certified by this CA: never renewed by it
        recertify(rig.first, "ocsp", issuing_cert=other_cert, issuing_key=other_key, serial=5, now=now)


def test_the_active_member_renews_when_fewer_than_renew_before_days_are_left() -> None:
    rig = Rig(now=T0 + timedelta(days=61))  # 29 days left of 90
    newest = asyncio.run(rig.keeper.tick())
    assert newest is not None and len(rig.store.rows) == 2
    cert = newest.certificate
    assert cert.public_key() == rig.first.public_key() and newest.key_id == b"k1"
    assert cert.not_valid_after_utc == rig.now + OCSP_SIGNER_VALIDITY
    serial = format(cert.serial_number, "x")
    # Accounted before it was signed, stored after, both under the member's epoch.
    assert rig.store.log == [("certifying", serial, 7), ("created", serial, 7)]
    # Every answer from now on carries the new certificate and verifies under the same key.
    assert rig.responder.signer_certificate == cert and rig.keys_asked == [b"k1"]
    response = rig.response()
    assert response.certificates == [cert]
    rig.first.public_key().verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    # Renewed: the next check leaves it be.
    asyncio.run(rig.keeper.tick())
    assert len(rig.store.rows) == 2


def test_not_due_nothing_is_signed() -> None:
    rig = Rig(now=T0 + timedelta(days=59))  # 31 days left
    asyncio.run(rig.keeper.tick())
    assert len(rig.store.rows) == 1 and rig.store.log == [] and rig.responder.signer_certificate == rig.first


def test_a_passive_member_does_not_renew_but_takes_the_newest() -> None:
    rig = Rig(now=T0 + timedelta(days=80), active=False)
    asyncio.run(rig.keeper.tick())
    assert len(rig.store.rows) == 1 and rig.store.log == []
    # The active member renewed meanwhile: this member signs with that certificate at its next check.
    renewed = recertify(rig.first, "ocsp", issuing_cert=rig.issuing_cert, issuing_key=rig.issuing_key, serial=77,
                        now=rig.now)
    rig.store.rows.append(OcspSignerRecord("issuing-1", renewed.public_bytes(PEM).decode(), b"k1"))
    asyncio.run(rig.keeper.tick())
    assert rig.responder.signer_certificate == renewed and rig.response().certificates == [renewed]


def test_a_fenced_member_signs_nothing() -> None:
    rig = Rig(now=T0 + timedelta(days=61))
    rig.store.epoch = 8  # another member became active
    with pytest.raises(FencedOut):
        asyncio.run(rig.keeper.tick())
    assert len(rig.store.rows) == 1 and rig.store.log == [] and rig.responder.signer_certificate == rig.first


def test_a_responder_capped_by_the_issuing_ca_is_not_renewed_on_every_check() -> None:
    rig = Rig(now=T0 + timedelta(days=1), ca_days=20)  # the first certificate ends with the CA, 19 days from now
    assert rig.first.not_valid_after_utc == rig.issuing_cert.not_valid_after_utc
    asyncio.run(rig.keeper.tick())
    assert len(rig.store.rows) == 1 and rig.store.log == []
