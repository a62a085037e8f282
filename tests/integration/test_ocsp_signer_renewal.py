"""The OCSP responder's certificate renewed on MariaDB and SoftHSM (hapki.cara.ocsp_signer): the running CARA
certifies its responder key again through the HSM, accounted (audit `ocsp_signer.certifying` committed under its
epoch before the signature, `ocsp_signer.created` after), stored as the newest, and its answers are signed under
the new certificate from its next check; a stale epoch signs and stores nothing. When it is due: tests/unit."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from hapki.cara.ca_init import OCSP_SIGNER_VALIDITY
from hapki.cara.ocsp import OcspResponder
from hapki.cara.ocsp_signer import OcspSignerKeeper
from hapki.cara.revocation_store import MariaDBRevocationStore
from hapki.contracts.errors import FencedOut
from hapki.lab import stack
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
    # Its serial was reserved like a requested certificate's and the intent resolved with the stored certificate.
    assert await query(sql, "SELECT purpose, state, epoch, member FROM signing_intents WHERE issuer = %s AND"
                            " serial = %s", (issuer.name, serial)) == [("ocsp_signer", "issued", epoch,
                                                                         cara.config.member)]
    assert json.loads(entries[0][2])["intent_id"]
    assert await query(sql, "SELECT COUNT(*) FROM ocsp_signers WHERE issuer = %s AND serial = %s",
                       (issuer.name, serial)) == [(1,)]
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


async def test_a_new_responder_key_from_the_ceremony_is_used_by_the_running_member(env, services, sql) -> None:
    """`hapki ca ocsp-rekey`: a new key in the HSM, certified by the issuing CA; the member checks it and answers
    under it from its next check. Renewal then certifies the new key, not the old one."""
    cara, _clm = services
    assert cara.ocsp is not None and cara.ocsp_signers is not None and cara.signer is not None
    issuer = cara.signer.issuer
    before = cara.ocsp.signer_certificate
    config = stack.write_config(stack.cara_config(env), env.base_dir / "cara-rekey.toml")

    done = await asyncio.to_thread(subprocess.run, [*stack.hapki_command(), "ca", "ocsp-rekey", "--config",
                                                    str(config)], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "unusable" not in done.stderr, done.stderr
    newest = await MariaDBRevocationStore(cara.db).ocsp_signer(issuer.name)
    assert newest is not None and newest.certificate.public_key() != before.public_key()
    newest.certificate.verify_directly_issued_by(issuer.certificate)
    [(detail,)] = await query(sql, "SELECT detail FROM audit_entries WHERE kind = 'ocsp_signer.created' AND serial = %s",
                              (format(newest.certificate.serial_number, "x"),))
    assert json.loads(detail)["key_id"] == newest.key_id.hex() != json.loads(detail)["replaces"]
    assert await query(sql, "SELECT purpose, state, epoch, member FROM signing_intents WHERE issuer = %s AND"
                            " serial = %s", (issuer.name, format(newest.certificate.serial_number, "x"))) == [
        ("ocsp_signer", "issued", 0, "ceremony")]

    await cara.ocsp_signers.tick()

    assert cara.ocsp.signer_certificate == newest.certificate
    response = ocsp.load_der_ocsp_response((await cara.ocsp.respond(ocsp_request(issuer.certificate, 0xBEEF))).der)
    assert response.certificates == [newest.certificate]
    public_key = newest.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


async def test_a_responder_key_that_is_not_sign_only_is_not_used(services) -> None:
    """The keeper checks a new key before it signs with it; refused, the responder in use stays."""
    cara, _clm = services
    assert cara.signer is not None and cara.hsm is not None
    issuer = cara.signer.issuer
    store = MariaDBRevocationStore(cara.db)
    # A responder still signing under something other than the newest certificate (any certificate will do).
    responder = OcspResponder(store=store, issuer=issuer, signer_cert=issuer.certificate,
                              signer_key=cara.signer.issuer_key, validity_seconds=60, clock=utcnow)

    def refuse(key_ids: object) -> None:
        raise ValueError("refusing the HSM keys: CKA_EXTRACTABLE true")

    keeper = OcspSignerKeeper(store=store, issuer=issuer, issuing_key=cara.signer.issuer_key, responder=responder,
                              signer_key=cara.hsm.private_key, activity=cara.signer, member="cara-1",
                              renew_before=timedelta(days=30), check_seconds=300, clock=utcnow,
                              key_id=b"a key before", check_keys=refuse)
    with pytest.raises(ValueError, match="CKA_EXTRACTABLE"):
        await keeper.tick()
    assert responder.signer_certificate == issuer.certificate


# --- the delegated signers' serials (migration 0010, hapki.runtime.delegated_intents) ---

async def test_every_delegated_signer_certificate_has_its_serial_reserved_and_issued(services, sql) -> None:
    """The ceremony (`hapki ca init`, run by the env fixture) reserved the OCSP responder's and the audit signer's
    serials before signing; the invariants pair every such certificate with its issued intent."""
    from hapki.runtime.invariants import violations

    cara, _clm = services
    assert cara.signer is not None
    issuer = cara.signer.issuer.name
    for table, purpose in (("ocsp_signers", "ocsp_signer"), ("audit_signers", "audit_signer")):
        rows = await query(sql, f"SELECT s.serial, i.state, i.purpose FROM {table} s JOIN signing_intents i"
                                " ON i.issuer = s.issuer AND i.serial = s.serial WHERE s.issuer = %s", (issuer,))
        assert rows and all(state == "issued" and kind == purpose for _, state, kind in rows), rows
    found = await violations(sql, quiet=False)
    assert not found["delegated_intent_without_certificate"] and not found["delegated_certificate_without_issued_intent"]


async def test_a_delegated_certificate_cannot_take_a_serial_a_requested_one_has(services, client) -> None:
    """Invariant 3 across every certificate of one CA: the UNIQUE (issuer, serial) refuses the reservation."""
    from hapki.cara.store import MariaDBSigningStore
    from hapki.contracts.errors import DuplicateKey
    from integration.conftest import issue_server_certificate

    cara, _clm = services
    assert cara.signer is not None
    issued = await issue_server_certificate(client, "serial-taken.example.com", "delegated-tests")
    with pytest.raises(DuplicateKey):
        await MariaDBSigningStore(cara.db).reserve_delegated(
            issuer=cara.signer.issuer.name, serial=issued.serial, purpose="ocsp_signer", now=utcnow())


async def test_a_ceremony_that_cannot_make_the_certificate_abandons_its_serial(services, sql, monkeypatch) -> None:
    from hapki.cara import ca_init
    from hapki.cara.store import MariaDBSigningStore
    from hapki.cli import commands

    cara, _clm = services
    assert cara.signer is not None
    issuer = cara.signer.issuer

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("the HSM refused to generate the key")

    monkeypatch.setattr(ca_init, "create_delegated_signer", broken)
    with pytest.raises(ValueError, match="refused"):
        await commands._add_signer(None, "audit", cara.db, MariaDBSigningStore(cara.db),  # type: ignore[arg-type]
                                   MariaDBRevocationStore(cara.db), issuer, [])
    [(intent_id, state, resolution)] = await query(
        sql, "SELECT id, state, resolution FROM signing_intents WHERE purpose = 'audit_signer' AND member ="
             " 'ceremony' ORDER BY created_at DESC LIMIT 1")
    assert state == "abandoned" and "refused to generate" in resolution
    assert await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind = 'intent.abandoned' AND detail LIKE %s",
                       (f"%{intent_id}%",)) == [(1,)]
