"""CLM's one-insert record path against real MariaDB: the unique keys, not a read first, decide repeats."""

from __future__ import annotations

import uuid
import pytest

from hapki.clm.ports import NewRequest
from hapki.contracts.errors import IdempotencyConflict
from hapki.contracts.models import IssueCertificate
from hapki.runtime.clock import utcnow
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
