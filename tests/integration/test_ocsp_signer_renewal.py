"""The OCSP responder's certificate renewed on MariaDB and SoftHSM (hapki.cara.ocsp_signer): the running CARA
certifies its responder key again through the HSM, accounted (audit `ocsp_signer.certifying` committed under its
epoch before the signature, `ocsp_signer.created` after), stored as the newest, and its answers are signed under
the new certificate from its next check; a stale epoch signs and stores nothing. When it is due: tests/unit."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from hapki.cara.ca_init import OCSP_SIGNER_VALIDITY
from hapki.cara.revocation_store import MariaDBRevocationStore
from hapki.contracts.errors import FencedOut
from hapki.runtime.clock import utcnow
from integration.conftest import query

pytestmark = pytest.mark.integration


def ocsp_request(issuer_cert, serial: int) -> bytes:  # type: ignore[no-untyped-def]
    name_hash = hashes.Hash(hashes.SHA1())
    name_hash.update(issuer_cert.subject.public_bytes())
    key_hash = hashes.Hash(hashes.SHA1())
    key_hash.update(issuer_cert.public_key().public_bytes(serialization.Encoding.X962,
                                                          serialization.PublicFormat.UncompressedPoint))
    return ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash.finalize(), key_hash.finalize(), serial, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)


async def test_the_active_member_renews_its_responder_and_answers_under_it(services, sql) -> None:
    cara, _clm = services
    assert cara.ocsp is not None and cara.ocsp_signers is not None and cara.signer is not None
    issuer = cara.signer.issuer
    store = MariaDBRevocationStore(cara.db)
    before = cara.ocsp.signer_certificate
    current = await store.ocsp_signer(issuer.name)
    assert current is not None and current.certificate == before
    epoch = cara.signer.epoch
    assert epoch is not None

    # Certificates end on a whole second: one renewed within the second of the ceremony would not end later.
    await asyncio.sleep(max(0.0, (before.not_valid_after_utc - OCSP_SIGNER_VALIDITY - utcnow()).total_seconds() + 1))
    renewed = await cara.ocsp_signers.renew(current, epoch)  # what a check does once it is due

    cert = renewed.certificate
    assert renewed.key_id == current.key_id and cert.public_key() == before.public_key()
    assert cert.serial_number != before.serial_number and cert.not_valid_after_utc > before.not_valid_after_utc
    cert.verify_directly_issued_by(issuer.certificate)  # signed through the HSM by the issuing CA key
    newest = await store.ocsp_signer(issuer.name)
    assert newest is not None and newest.certificate == cert
    serial = format(cert.serial_number, "x")
    entries = await query(sql, "SELECT kind, epoch, detail FROM audit_entries WHERE serial = %s AND kind LIKE"
                               " 'ocsp_signer.%%' ORDER BY created_at, id", (serial,))
    assert [(kind, entry_epoch) for kind, entry_epoch, _ in entries] == [
        ("ocsp_signer.certifying", epoch), ("ocsp_signer.created", epoch)]
    created = json.loads(entries[1][2])
    assert created["replaces_serial"] == format(before.serial_number, "x")
    assert created["key_id"] == current.key_id.hex() == created["replaces"]

    await cara.ocsp_signers.tick()  # the periodic check: every member signs with the newest from then on
    assert cara.ocsp.signer_certificate == cert
    answer = await cara.ocsp.respond(ocsp_request(issuer.certificate, 0x5EED))
    response = ocsp.load_der_ocsp_response(answer.der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificates == [cert]
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))

    # A member whose epoch is no longer current signs and stores nothing.
    (signers_before,), = await query(sql, "SELECT COUNT(*) FROM ocsp_signers WHERE issuer = %s", (issuer.name,))
    (entries_before,), = await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind LIKE 'ocsp_signer.%%'")
    with pytest.raises(FencedOut):
        await cara.ocsp_signers.renew(current, epoch - 1)
    assert await query(sql, "SELECT COUNT(*) FROM ocsp_signers WHERE issuer = %s", (issuer.name,)) == [
        (signers_before,)]
    assert await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind LIKE 'ocsp_signer.%%'") == [
        (entries_before,)]
