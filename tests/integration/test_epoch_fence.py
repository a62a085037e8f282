"""Only the member with the current epoch commits signing results (split brain: both think they are active)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from hapki.cara.main import CaraRuntime
from hapki.cara.store import MariaDBSigningStore
from hapki.contracts.errors import FencedOut
from hapki.contracts.models import IssueCertificate, RequestStatus
from hapki.lab import stack
from hapki.runtime.clock import utcnow
from helpers.csr import make_csr, make_key
from integration.conftest import query

pytestmark = pytest.mark.integration


def _request(name: str) -> IssueCertificate:
    csr_pem, _ = make_csr([name], key=make_key("p256"), cn=name)
    return IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="fence-tests",
                            idempotency_key=uuid.uuid4().hex)


async def test_a_stale_epoch_cannot_commit_and_steps_down(env, services, client, sql) -> None:
    old, _clm = services
    old_epoch = old.signer.epoch
    # Another member becomes active (VRRP says so, rightly or not): it bumps the epoch. It then goes quiet, so
    # the old member, which still believes it is active, is the only consumer left.
    new = CaraRuntime(stack.cara_config(env, member="cara-2"))
    new_epoch = await new.start()
    await new.signer.stop()
    try:
        assert new_epoch > old_epoch
        store = MariaDBSigningStore(old.db)
        with pytest.raises(FencedOut):
            await store.reserve(intent_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex, issuer="issuing-1",
                                serial="ab" * 19, epoch=old_epoch, member="cara-1", now=utcnow())

        pending = asyncio.create_task(client.issue(_request("fence.example.com")))
        await asyncio.wait_for(old.signer.fenced.wait(), timeout=10)
        assert not old.signer.active, "a fenced member must stop consuming"

        final_epoch = await new.signer.start()  # the request was NAKed, not lost: the new member issues it
        reply = await asyncio.wait_for(pending, timeout=15)
        assert reply.error is None and reply.status is RequestStatus.ISSUED, reply
        certs = await query(sql, "SELECT epoch FROM certificates WHERE request_id = %s", (reply.request_id,))
        assert certs == [(final_epoch,)]
        intents = await query(sql, "SELECT epoch, state FROM signing_intents WHERE request_id = %s",
                              (reply.request_id,))
        assert (final_epoch, "issued") in intents
        assert all(state == "abandoned" for epoch, state in intents if epoch != final_epoch), intents
    finally:
        await new.stop()
        await old.signer.stop()
        await old.signer.start()  # give the module's signer its role back for the tests that follow


async def test_invariant_checks_hold_and_would_catch_a_stale_commit(env, services, client, sql) -> None:
    from hapki.runtime.invariants import violations

    reply = await client.issue(_request("order.example.com"))
    assert reply.status is RequestStatus.ISSUED
    assert {name: rows for name, rows in (await violations(sql)).items() if rows} == {}

    # Fabricate what a broken fence would leave behind: a certificate of epoch e committed after the change to e+1.
    cara, _ = services
    store = MariaDBSigningStore(cara.db)
    cert_epoch = (await query(sql, "SELECT epoch, fence_seq FROM certificates WHERE request_id = %s",
                              (reply.request_id,)))[0]
    new_epoch = await store.bump_epoch("cara-intruder", utcnow())
    try:
        change = await query(sql, "SELECT fence_seq FROM epoch_changes WHERE tier = 'cara' AND epoch = %s",
                             (cert_epoch[0] + 1,))
        await query(sql, "UPDATE certificates SET fence_seq = %s WHERE request_id = %s",
                    (change[0][0] + 1, reply.request_id))
        found = await violations(sql)
        assert [row[0] for row in found["stale_epoch_commits"]] == [reply.serial]
    finally:
        await query(sql, "UPDATE certificates SET fence_seq = %s WHERE request_id = %s", (cert_epoch[1], reply.request_id))
        assert new_epoch > cert_epoch[0]
        await cara.signer.stop()
        await cara.signer.start()
