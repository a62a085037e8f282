"""End to end on real NATS, MariaDB and SoftHSM: CLM -> JetStream -> CARA -> HSM -> MariaDB -> reply."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hapki.contracts.models import IssueCertificate, RequestStatus
from hapki.lab import stack
from helpers.csr import make_csr, make_key
from integration.conftest import chain_files, query

pytestmark = pytest.mark.integration


def _request(names: list[str], profile: str = "tls-server", key_kind: str = "p256", **kw: object) -> IssueCertificate:
    csr_pem, _ = make_csr(names, key=make_key(key_kind, fresh=True), cn=names[0])
    return IssueCertificate(csr_pem=csr_pem, profile=profile, requester="tests", **kw)


async def test_issue_returns_a_certificate_that_openssl_verifies_strictly(client, tmp_path: Path) -> None:
    reply = await client.issue(_request(["www.example.com", "api.example.com", "192.0.2.10"]))
    assert reply.error is None, reply.error
    assert reply.status is RequestStatus.ISSUED
    leaf, inter, root = chain_files(tmp_path, reply.certificate_pem, reply.chain_pem)
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(root), "-untrusted", str(inter),
         str(leaf)], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    assert format(cert.serial_number, "x") == reply.serial
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"www.example.com", "api.example.com"}
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    assert reply.not_after - reply.not_before == cert.not_valid_after_utc - cert.not_valid_before_utc


async def test_client_profile_gets_client_auth_and_its_own_validity(client) -> None:
    reply = await client.issue(_request(["device1.example.com"], profile="tls-client"))
    assert reply.error is None, reply.error
    cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server = await client.issue(_request(["web.example.com"]))
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) < (server.not_after - server.not_before)


async def test_repeated_idempotency_key_returns_the_same_certificate(client, sql) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    request = _request(["idem.example.com"], idempotency_key=key)
    first, *others = await asyncio.gather(*(client.issue(request) for _ in range(5)))
    again = await client.issue(request)
    assert first.error is None and first.certificate_pem
    for reply in [*others, again]:
        assert (reply.request_id, reply.serial, reply.certificate_pem) == (
            first.request_id, first.serial, first.certificate_pem)
    rows = await query(sql, "SELECT COUNT(*) FROM certificates c JOIN requests r ON r.id = c.request_id"
                            " WHERE r.idempotency_key = %s", (key,))
    assert rows == [(1,)]
    rows = await query(sql, "SELECT COUNT(*) FROM signing_intents WHERE request_id = %s", (first.request_id,))
    assert rows == [(1,)]


async def test_status_and_certificate_lookups(client) -> None:
    issued = await client.issue(_request(["lookup.example.com"]))
    status = await client.status(issued.request_id)
    assert status.status is RequestStatus.ISSUED and status.certificate_pem == issued.certificate_pem
    by_serial = await client.certificate(issued.serial)
    assert by_serial.request_id == issued.request_id and by_serial.certificate_pem == issued.certificate_pem
    assert by_serial.chain_pem == issued.chain_pem


async def test_serials_are_unique_positive_random_and_at_most_20_octets(client, sql) -> None:
    replies = await asyncio.gather(*(client.issue(_request([f"s{i}.example.com"])) for i in range(40)))
    serials = [int(r.serial, 16) for r in replies if r.error is None]
    assert len(serials) == 40
    assert len(set(serials)) == 40
    for serial in serials:
        assert 0 < serial and (serial.bit_length() + 8) // 8 <= 20  # DER INTEGER content incl. sign octet
        assert serial.bit_length() >= 64
    # Reserved in the database before signing: each has exactly one intent, resolved as issued.
    ids = [r.request_id for r in replies]
    rows = await query(sql, "SELECT serial, state FROM signing_intents WHERE request_id IN (%s)"
                       % ",".join(["%s"] * len(ids)), ids)
    assert sorted(rows) == sorted((r.serial, "issued") for r in replies)
    # No two random serials share a long prefix (a counter or a weak generator would).
    prefixes = {s >> 100 for s in serials}
    assert len(prefixes) == 40


async def test_the_ca_rechecks_and_rejects_a_request_clm_should_not_have_sent(env, services, client, sql) -> None:
    """A signing request whose CSR signature is broken reaches CARA only by bypassing CLM: CARA refuses it."""
    from hapki.clm.ports import NewRequest
    from hapki.clm.queue import JetStreamSigningQueue
    from hapki.clm.store import MariaDBRequestStore
    from hapki.contracts.errors import ErrorCode
    from hapki.contracts.models import SignCertificate
    from hapki.runtime.approval import ApprovalKey
    from hapki.runtime.clock import utcnow
    from helpers.csr import csr_der, der_to_pem

    _, clm = services
    der = bytearray(csr_der(make_csr(["bypass.example.com"], key=make_key("p256"))[0]))
    der[-5] ^= 0x01
    request_id = uuid.uuid4().hex
    # Approved with CLM's own key: the approval holds, and the CA's re-verification of the CSR is what refuses.
    approved = ApprovalKey.from_file(stack.approval_keys(env.base_dir / "approval")[0]).sign(SignCertificate(
        request_id=request_id, profile="tls-server", csr_pem=der_to_pem(bytes(der)), dns_names=["bypass.example.com"],
        validity_seconds=3600, key_usage=["digital_signature"], extended_key_usage=["server_auth"],
    ))
    await MariaDBRequestStore(clm.db).record(
        NewRequest(request_id=request_id, requester="tests", idempotency_key=None, profile="tls-server",
                   csr_sha256="0" * 64, approved=approved), utcnow())
    await JetStreamSigningQueue(clm.nc.jetstream()).submit(approved)
    for _ in range(100):
        status = await client.status(request_id)
        if status.status is RequestStatus.FAILED:
            break
        await asyncio.sleep(0.05)
    assert status.status is RequestStatus.FAILED
    assert status.error is not None and status.error.code is ErrorCode.SIGNING_REJECTED
    assert await query(sql, "SELECT state FROM signing_intents WHERE request_id = %s", (request_id,)) == []


async def test_watcher_records_role_changes_in_the_ha_stream(env, span_exporter) -> None:
    """`hapki serve watcher` in-process: a VIP this host holds (loopback here) -> an `active` event, kept in JetStream."""
    import nats

    from hapki.contracts import subjects
    from hapki.contracts.models import HAEvent, HARole
    from hapki.watcher.main import WatcherConfig, WatcherRuntime

    runtime = WatcherRuntime(WatcherConfig(member="cara-1", tier="cara", vip="127.0.0.1",
                                           nats=stack.nats_config(env, "watcher")))
    await runtime.start()
    nc = await nats.connect(**env.nats.connect_kwargs())
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subjects.ha_events("cara", "cara-1"), ordered_consumer=True)
        msg = await sub.next_msg(timeout=5)
        event = HAEvent.model_validate_json(msg.data)
        assert (event.member, event.tier, event.role, event.holds_vip) == ("cara-1", "cara", HARole.ACTIVE, True)
        assert "traceparent" in (msg.headers or {})
        info = await js.stream_info(subjects.HA_EVENTS_STREAM)
        assert info.state.messages >= 1  # history survives the watcher
    finally:
        await runtime.stop()
        await nc.close()
