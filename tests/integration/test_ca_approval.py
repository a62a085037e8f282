"""The CA signs only what CLM approved (real NATS, MariaDB, SoftHSM): forged signing requests published straight to
the signing subject, as by a party holding CLM's publish rights, are refused and audited; nothing is reserved or
signed for them, and normal issuance goes on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from hapki.cara.main import CaraRuntime
from hapki.clm.main import ClmRuntime
from hapki.clm.ports import NewRequest
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts import subjects
from hapki.contracts.models import IssueCertificate, IssueReply, RequestStatus, SigningFailed, StatusQuery
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.approval import ApprovalKey
from hapki.runtime.clock import utcnow
from helpers.csr import make_csr, make_key
from helpers.signing import audit_entries, publish_signing_request, signing_content
from integration.conftest import query

pytestmark = pytest.mark.integration

def _clm_key(env: LocalEnv) -> ApprovalKey:
    """CLM's own approval key: what an attacker who stole it (or a buggy CLM) signs with."""
    return ApprovalKey.from_file(stack.approval_keys(env.base_dir / "approval")[0])


@pytest.fixture
async def bus(env: LocalEnv) -> AsyncIterator[tuple[Any, list[SigningFailed]]]:
    """A plain NATS connection (the attacker's, or an old CLM's) and the SigningFailed events CARA publishes."""
    nc = await nats.connect(**env.nats.connect_kwargs("clm"))  # stolen CLM credentials: may publish signing requests
    failures: list[SigningFailed] = []

    async def on_failed(msg: Any) -> None:
        failures.append(SigningFailed.model_validate_json(msg.data))

    await nc.subscribe(subjects.CARA_FAILED, cb=on_failed)
    try:
        yield nc, failures
    finally:
        await nc.close()


async def _status(clm: ClmRuntime, request_id: str, want: RequestStatus) -> IssueReply:
    assert clm.service is not None
    for _ in range(200):
        reply = await clm.service.status(StatusQuery(request_id=request_id))
        if reply.status is want:
            return reply
        await asyncio.sleep(0.05)
    raise AssertionError(f"request {request_id} never became {want.value}: {reply}")


async def _nothing_reserved_or_signed(sql: Any, cara: CaraRuntime, request_id: str, signatures: int) -> None:
    assert await query(sql, "SELECT id FROM signing_intents WHERE request_id = %s", (request_id,)) == []
    assert await query(sql, "SELECT serial FROM certificates WHERE request_id = %s", (request_id,)) == []
    assert cara.signer is not None and cara.signer.signatures == signatures


@pytest.mark.parametrize("forgery", ["no approval", "approval by another key under CLM's key id",
                                     "CLM's approval over other content"])
async def test_a_forged_signing_request_is_refused_and_audited(env, services, client, sql, bus, forgery: str) -> None:
    cara, _ = services
    nc, failures = bus
    clm_key = _clm_key(env)
    request = signing_content(["forged.example.com"])
    if forgery == "approval by another key under CLM's key id":
        request = ApprovalKey.generate().sign(request).model_copy(update={"approval_key_id": clm_key.key_id})
    elif forgery == "CLM's approval over other content":
        # A genuine approval replayed on content the attacker chose (another name, same everything else).
        genuine = clm_key.sign(signing_content(["harmless.example.com"], request.request_id))
        request = request.model_copy(update={"approval": genuine.approval, "approval_key_id": genuine.approval_key_id})
    assert cara.signer is not None
    signatures = cara.signer.signatures

    await publish_signing_request(nc, request)

    [entry] = await audit_entries(sql, request.request_id, "signing.refused")
    assert entry["code"] == "APPROVAL_INVALID"
    assert entry["stored_request"] == "absent" and entry["names"] == ["forged.example.com"]
    await asyncio.sleep(1.0)  # longer than ack_wait: a message that was not termed would come back by now
    await _nothing_reserved_or_signed(sql, cara, request.request_id, signatures)
    assert len(await query(sql, "SELECT id FROM audit_entries WHERE request_id = %s", (request.request_id,))) == 1
    # No request changed state, so no client is told anything about one.
    assert [f for f in failures if f.request_id == request.request_id] == []
    # The CA goes on signing what CLM approved.
    csr_pem, _ = make_csr(["after-forgery.example.com"], key=make_key("p256", fresh=True), cn="after-forgery.example.com")
    reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests"))
    assert reply.status is RequestStatus.ISSUED, reply.error
    assert cara.signer.signatures == signatures + 1


async def test_a_forgery_naming_a_pending_request_leaves_that_request_alone(env, services, sql, bus) -> None:
    """An unauthenticated message cannot fail someone else's request: only exactly what CLM recorded may."""
    cara, clm = services
    nc, failures = bus
    genuine = _clm_key(env).sign(signing_content(["victim.example.com"]))
    await MariaDBRequestStore(clm.db).record(NewRequest(
        request_id=genuine.request_id, requester="tests", idempotency_key=None, profile="tls-server",
        csr_sha256="0" * 64, approved=genuine), utcnow())
    forged = genuine.model_copy(update={"dns_names": ["victim.example.com", "attacker.example.com"]})

    await publish_signing_request(nc, forged)

    [entry] = await audit_entries(sql, genuine.request_id, "signing.refused")
    assert entry["code"] == "APPROVAL_INVALID" and entry["stored_request"] == "differs"
    assert (await query(sql, "SELECT status FROM requests WHERE id = %s", (genuine.request_id,))) == [("pending",)]
    assert [f for f in failures if f.request_id == genuine.request_id] == []
    # The genuine message (its publish was lost, say) is still signed when it comes; JetStream's de-duplication
    # window keys on the message id, so it arrives as the outbox sweep would send it, under a fresh id.
    await nc.jetstream().publish(subjects.CARA_SIGN, genuine.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": f"{genuine.request_id}-retry"})
    await _status(clm, genuine.request_id, RequestStatus.ISSUED)


async def test_a_request_queued_before_approvals_existed_fails_for_good(services, sql, bus) -> None:
    """An old CLM's pending request (stored and queued without approval) is refused, and marked failed, once."""
    cara, clm = services
    nc, failures = bus
    old = signing_content(["queued-before-upgrade.example.com"])
    await MariaDBRequestStore(clm.db).record(NewRequest(
        request_id=old.request_id, requester="tests", idempotency_key=None, profile="tls-server",
        csr_sha256="0" * 64, approved=old), utcnow())
    assert cara.signer is not None
    signatures = cara.signer.signatures

    await publish_signing_request(nc, old)

    reply = await _status(clm, old.request_id, RequestStatus.FAILED)
    assert reply.error.code.value == "APPROVAL_INVALID"
    [entry] = await audit_entries(sql, old.request_id, "request.failed")
    assert entry["code"] == "APPROVAL_INVALID"
    for _ in range(40):
        if any(f.request_id == old.request_id for f in failures):
            break
        await asyncio.sleep(0.05)
    assert [f.error.code.value for f in failures if f.request_id == old.request_id] == ["APPROVAL_INVALID"]
    await _nothing_reserved_or_signed(sql, cara, old.request_id, signatures)


async def test_a_validly_approved_request_outside_the_profile_is_refused_by_the_ca(env, services, sql, bus) -> None:
    """CLM's key is stolen (or CLM has a bug): the CA's own profile check still refuses a name outside the profile."""
    cara, clm = services
    nc, failures = bus
    key = _clm_key(env)
    base = signing_content(["www.example.com"])
    outside = key.sign(base.model_copy(update={"dns_names": ["www.example.com", "www.evil.com"]}))
    assert cara.signer is not None
    signatures = cara.signer.signatures

    # Published by whoever stole the key: refused, audited, no request touched.
    await publish_signing_request(nc, outside)
    [entry] = await audit_entries(sql, outside.request_id, "signing.refused")
    assert entry["code"] == "POLICY_VIOLATION"
    await _nothing_reserved_or_signed(sql, cara, outside.request_id, signatures)

    # The same content recorded by CLM (a CLM whose profiles allowed it): the request fails with the CA's reason.
    recorded = key.sign(base.model_copy(update={"request_id": uuid.uuid4().hex,
                                                "dns_names": ["www.example.com", "www.evil.com"]}))
    await MariaDBRequestStore(clm.db).record(NewRequest(
        request_id=recorded.request_id, requester="tests", idempotency_key=None, profile="tls-server",
        csr_sha256="0" * 64, approved=recorded), utcnow())
    await publish_signing_request(nc, recorded)
    reply = await _status(clm, recorded.request_id, RequestStatus.FAILED)
    assert reply.error.code.value == "POLICY_VIOLATION"
    assert "dns_names" in reply.error.message
    [entry] = await audit_entries(sql, recorded.request_id, "request.failed")
    assert entry["code"] == "POLICY_VIOLATION"
    await _nothing_reserved_or_signed(sql, cara, recorded.request_id, signatures)
    for _ in range(40):
        if any(f.request_id == recorded.request_id for f in failures):
            break
        await asyncio.sleep(0.05)
    assert [f.error.code.value for f in failures if f.request_id == recorded.request_id] == ["POLICY_VIOLATION"]
