"""CLM's recording batches with a fake database: every caller gets an answer, whatever the batch's transaction does."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from hapki.cli.client import new_key_and_csr
from hapki.clm.ports import NewRequest
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts.errors import DatabaseError, DuplicateKey
from hapki.contracts.models import IssueCertificate
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve

NOW = datetime(2026, 11, 26, tzinfo=UTC)
PROFILES = load_profiles(SHIPPED_PROFILES_PATH)
CSR_PEM = new_key_and_csr(["batch.example.com"])[0].decode()


def _request() -> NewRequest:
    request_id = uuid.uuid4().hex
    approved = approve(IssueCertificate(csr_pem=CSR_PEM, profile="tls-server", requester="unit"), PROFILES, request_id)
    return NewRequest(request_id=request_id, requester="unit", idempotency_key=None, profile="tls-server",
                      csr_sha256="a" * 64, approved=approved)


class FakeDatabase:
    """Database.run that records transaction names; `fail(name)` says what to raise for a transaction, if anything.
    Transactions wait for `release`, so the test decides when the first one ends."""

    def __init__(self, fail: Any) -> None:
        self.names: list[str] = []
        self._fail = fail
        self.release = asyncio.Event()

    async def run(self, body: Any, *, name: str, **_: Any) -> Any:
        self.names.append(name)
        await self.release.wait()  # every caller queues behind the first transaction
        if (error := self._fail(name)) is not None:
            raise error
        return None


async def _record_all(db: FakeDatabase, count: int) -> tuple[MariaDBRequestStore, list[Any]]:
    store = MariaDBRequestStore(db, in_flight=1)  # type: ignore[arg-type]
    calls = [asyncio.ensure_future(store.record(_request(), NOW)) for _ in range(count)]
    await asyncio.sleep(0)
    db.release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    return store, outcomes


async def test_a_database_that_is_down_fails_every_caller_of_the_batch_once() -> None:
    db = FakeDatabase(lambda name: DatabaseError("no node answers"))
    store, outcomes = await _record_all(db, 6)
    assert store.batches == [6]  # all six were waiting when the recording loop first ran
    assert all(isinstance(o, DatabaseError) for o in outcomes)
    assert db.names == ["clm.record_batch"]  # not retried request by request: the database is down


async def test_a_unique_key_in_a_batch_records_each_request_on_its_own() -> None:
    db = FakeDatabase(lambda name: DuplicateKey("uq") if name == "clm.record_batch" else None)
    store, outcomes = await _record_all(db, 4)
    assert store.batches == [4]
    assert [o.created for o in outcomes] == [True] * 4
    assert db.names == ["clm.record_batch", "clm.record", "clm.record", "clm.record", "clm.record"]


async def test_a_caller_that_stops_waiting_leaves_the_others_answered() -> None:
    db = FakeDatabase(lambda name: None)
    store = MariaDBRequestStore(db, in_flight=1)  # type: ignore[arg-type]
    calls = [asyncio.ensure_future(store.record(_request(), NOW)) for _ in range(4)]
    await asyncio.sleep(0)
    calls[2].cancel()
    db.release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert [o.created for i, o in enumerate(outcomes) if i != 2] == [True] * 3


def test_the_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MariaDBRequestStore(object(), in_flight=0)  # type: ignore[arg-type]
