"""CLM's one-insert record path against real MariaDB: the unique keys, not a read first, decide repeats."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from hapki.clm.ports import NewRequest
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts.errors import IdempotencyConflict
from hapki.contracts.models import IssueCertificate
from hapki.lab import stack
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve
from helpers.csr import make_csr, make_key
from integration.conftest import query

pytestmark = pytest.mark.integration

PROFILES = load_profiles(SHIPPED_PROFILES_PATH)


def _new(key: str | None, name: str = "record.example.com", digest: str = "a" * 64) -> NewRequest:
    csr_pem, _ = make_csr([name], key=make_key("p256", fresh=True), cn=name)
    request_id = uuid.uuid4().hex
    approved = approve(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="record-tests"), PROFILES,
                       request_id)
    return NewRequest(request_id=request_id, requester="record-tests", idempotency_key=key, profile="tls-server",
                      csr_sha256=digest, approved=approved)


async def test_a_repeat_of_the_key_answers_with_the_first_request_and_writes_nothing(clm_store, sql) -> None:
    key = uuid.uuid4().hex
    first = await clm_store.record(_new(key), utcnow())
    repeat = await clm_store.record(_new(key), utcnow())  # same CSR digest and profile, a fresh request id
    assert first.created and not repeat.created
    assert repeat.request_id == first.request_id and repeat.approved == first.approved
    assert await query(sql, "SELECT COUNT(*) FROM requests WHERE requester = 'record-tests' AND idempotency_key = %s",
                       (key,)) == [(1,)]
    assert await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind = 'request.recorded' AND request_id = %s",
                       (first.request_id,)) == [(1,)]
    assert await query(sql, "SELECT kind, value FROM request_names WHERE request_id = %s ORDER BY kind",
                       (first.request_id,)) == [("cn", "record.example.com"), ("dns", "record.example.com")]

    with pytest.raises(IdempotencyConflict):
        await clm_store.record(_new(key, digest="b" * 64), utcnow())


@pytest.mark.parametrize("key", [None, "with-key"])
async def test_recording_the_same_request_again_is_our_own_earlier_attempt(clm_store, sql, key: str | None) -> None:
    """A body run again after a COMMIT whose outcome was unknown finds its own row: created, not a conflict."""
    request = _new(None if key is None else uuid.uuid4().hex)
    assert (await clm_store.record(request, utcnow())).created
    again = await clm_store.record(request, utcnow())
    assert again.created and again.request_id == request.request_id
    assert await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind = 'request.recorded' AND request_id = %s",
                       (request.request_id,)) == [(1,)]


async def test_requests_arriving_together_are_recorded_in_one_transaction_each_with_its_own_rows(env, sql) -> None:
    """One recording transaction in flight: the requests queued behind it go in together, rows and audit each."""
    db = Database(stack.clm_config(env).database)
    store = MariaDBRequestStore(db, in_flight=1)
    try:
        requests = [_new(uuid.uuid4().hex, name=f"batch-{i}.example.com") for i in range(12)]
        recorded = await asyncio.gather(*(store.record(r, utcnow()) for r in requests))
    finally:
        await db.close()
    assert [(r.request_id, r.created) for r in recorded] == [(r.request_id, True) for r in requests]
    assert max(store.batches) > 1, store.batches  # the first went alone, the others queued behind it together
    assert sum(store.batches) == len(requests)
    ids = tuple(r.request_id for r in requests)
    marks = ", ".join(["%s"] * len(ids))
    assert await query(sql, f"SELECT COUNT(*) FROM requests WHERE id IN ({marks}) AND status = 'pending'", ids) == [(12,)]
    assert await query(sql, f"SELECT request_id, COUNT(*) FROM audit_entries WHERE kind = 'request.recorded'"
                            f" AND request_id IN ({marks}) GROUP BY request_id", ids) == [(i, 1) for i in sorted(ids)]
    assert await query(sql, f"SELECT value FROM request_names WHERE kind = 'dns' AND request_id IN ({marks})"
                            " ORDER BY value", ids) == sorted((f"batch-{i}.example.com",) for i in range(12))


async def test_a_repeated_or_conflicting_key_in_a_batch_gets_its_own_answer_and_the_others_are_recorded(env, sql) -> None:
    """A unique key stops the batch's transaction; every request is then recorded on its own, for its answer."""
    key = uuid.uuid4().hex
    db = Database(stack.clm_config(env).database)
    store = MariaDBRequestStore(db, in_flight=1)
    try:
        first = await store.record(_new(key), utcnow())
        fresh = [_new(uuid.uuid4().hex, name=f"mixed-{i}.example.com") for i in range(6)]
        outcomes = await asyncio.gather(
            store.record(_new(None, name="head.example.com"), utcnow()),  # goes alone: the others queue behind it
            *(store.record(r, utcnow()) for r in fresh[:3]),
            store.record(_new(key), utcnow()),  # a repeat: same CSR digest and profile
            store.record(_new(key, digest="c" * 64), utcnow()),  # the key with another CSR: refused
            *(store.record(r, utcnow()) for r in fresh[3:]),
            return_exceptions=True)
    finally:
        await db.close()
    assert max(store.batches) >= 8, store.batches
    head, fresh_outcomes, repeat, conflict = outcomes[0], [*outcomes[1:4], *outcomes[6:]], outcomes[4], outcomes[5]
    assert head.created
    assert [(o.request_id, o.created) for o in fresh_outcomes] == [(r.request_id, True) for r in fresh]
    assert (repeat.request_id, repeat.created) == (first.request_id, False)
    assert isinstance(conflict, IdempotencyConflict)
    assert await query(sql, "SELECT COUNT(*) FROM requests WHERE requester = 'record-tests' AND idempotency_key = %s",
                       (key,)) == [(1,)]
    ids = tuple(r.request_id for r in fresh)
    assert await query(sql, f"SELECT COUNT(*) FROM audit_entries WHERE kind = 'request.recorded'"
                            f" AND request_id IN ({', '.join(['%s'] * len(ids))})", ids) == [(6,)]
