"""ClmService with fakes for its ports: what the core does, without NATS or a database."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import pytest

from hapki.cli.client import new_key_and_csr
from hapki.clm.ports import NewRequest, Recorded
from hapki.runtime.approval import ApprovalKey
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.clm.service import ClmService
from hapki.contracts.models import CertificateIssued, IssueCertificate, IssueReply, RequestStatus, SignCertificate

NOW = datetime(2026, 11, 26, tzinfo=UTC)


class SlowStore:
    """Records requests by key; record() waits until released, as a stalled database would."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.records: list[NewRequest] = []
        self.by_key: dict[tuple[str, str | None], Recorded] = {}

    async def record(self, request: NewRequest, now: datetime) -> Recorded:
        self.records.append(request)
        await self.release.wait()
        key = (request.requester, request.idempotency_key)
        if key in self.by_key:
            return Recorded(self.by_key[key].request_id, False, self.by_key[key].approved)
        self.by_key[key] = Recorded(request.request_id, True, request.approved)
        return self.by_key[key]

    async def view(self, request_id: str) -> IssueReply:
        return IssueReply(request_id=request_id, status=RequestStatus.PENDING)


class Queue:
    def __init__(self) -> None:
        self.submitted: list[SignCertificate] = []

    async def submit(self, request: SignCertificate) -> None:
        self.submitted.append(request)


def _service(store: SlowStore, queue: Queue) -> ClmService:
    return ClmService(store=store, queue=queue, revocations=None, events=None, inventory=None,  # type: ignore[arg-type]
                      profiles=load_profiles(SHIPPED_PROFILES_PATH), approver=ApprovalKey.generate(), clock=lambda: NOW, wait_seconds=0.05)


def _request(names: list[str], key: str | None) -> IssueCertificate:
    return IssueCertificate(csr_pem=new_key_and_csr(names)[0].decode(), profile="tls-server", requester="unit",
                            idempotency_key=key)


async def test_a_retry_joins_the_attempt_in_progress_instead_of_queueing_another() -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    request = _request(["a.example.com"], "k1")
    first = asyncio.create_task(service.issue(request))
    await asyncio.sleep(0.01)
    first.cancel()  # the client gave up on its first attempt (connection closed) ...
    retry = asyncio.create_task(service.issue(request))  # ... and retried with the same key
    await asyncio.sleep(0.01)
    store.release.set()
    reply = await retry
    assert len(store.records) == 1  # one database transaction for both attempts
    assert reply.request_id == store.records[0].request_id and reply.status is RequestStatus.PENDING
    assert len(queue.submitted) == 1


async def test_a_different_csr_under_the_same_key_is_not_joined() -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    tasks = [asyncio.create_task(service.issue(_request(["a.example.com"], "k1"))),
             asyncio.create_task(service.issue(_request(["b.example.com"], "k1")))]
    await asyncio.sleep(0.01)
    store.release.set()
    await asyncio.gather(*tasks)
    assert len(store.records) == 2  # the store decides (IDEMPOTENCY_CONFLICT in the real one)


@pytest.mark.parametrize("keys", [(None, None), ("k1", "k2")])
async def test_requests_without_a_shared_key_run_on_their_own(keys: tuple[str | None, str | None]) -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    request = _request(["a.example.com"], None)
    tasks = [asyncio.create_task(service.issue(request.model_copy(update={"idempotency_key": k}))) for k in keys]
    await asyncio.sleep(0.01)
    store.release.set()
    await asyncio.gather(*tasks)
    assert len(store.records) == 2
    assert service._inflight == {}  # nothing left behind once done


async def test_a_retry_after_the_final_answer_is_answered_without_the_database() -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    service._wait = 5.0  # the CA's event comes well within the wait
    request = _request(["a.example.com"], "k1")
    store.release.set()
    first = asyncio.create_task(service.issue(request))
    while not queue.submitted:
        await asyncio.sleep(0.001)
    request_id = queue.submitted[0].request_id
    service.on_issued(CertificateIssued(request_id=request_id, serial="0a", issuer="issuing-1", certificate_pem="c",
                                        chain_pem="p", not_before=NOW, not_after=NOW))
    answer = await first
    assert answer.status is RequestStatus.ISSUED
    again = await service.issue(request)  # the client's attempt had timed out just before: it asks again
    assert again.status is RequestStatus.ISSUED and again.serial == "0a"
    assert again.model_dump_json() == answer.model_dump_json()  # the same answer on the wire
    assert len(store.records) == 1  # no second transaction
    service._wait = 0.05
    other = await asyncio.wait_for(service.issue(_request(["b.example.com"], "k1")), 1)  # another CSR: not cached
    assert len(store.records) == 2 and other.status is RequestStatus.PENDING


async def test_expired_final_answers_are_dropped_not_kept_until_the_count_cap() -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    service._wait = 5.0
    store.release.set()

    async def issued(names: list[str], key: str, serial: str) -> None:
        before = len(queue.submitted)
        task = asyncio.create_task(service.issue(_request(names, key)))
        while len(queue.submitted) == before:
            await asyncio.sleep(0.001)
        service.on_issued(CertificateIssued(request_id=queue.submitted[-1].request_id, serial=serial, issuer="issuing-1",
                                            certificate_pem="c", chain_pem="p", not_before=NOW, not_after=NOW))
        assert (await task).status is RequestStatus.ISSUED

    await issued(["a.example.com"], "k1", "0a")
    await issued(["b.example.com"], "k2", "0b")
    assert len(service._answered) == 2
    for key, kept in list(service._answered.items()):
        service._answered[key] = dataclasses.replace(kept, expires=0.0)  # both answers expire (in order) ...
    await issued(["c.example.com"], "k3", "0c")  # ... and the next final answer clears them out
    assert [key for _, key in service._answered] == ["k3"]


async def test_final_answers_kept_for_retries_are_bounded_in_number_whatever_the_rate(monkeypatch) -> None:
    """Within the TTL the count caps them (memory stays bounded at any rate): the oldest answer goes first."""
    from hapki.clm import service as service_module

    monkeypatch.setattr(service_module, "ANSWERED_MAX", 2)
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    service._wait = 5.0
    store.release.set()
    for i in range(3):
        task = asyncio.create_task(service.issue(_request([f"n{i}.example.com"], f"k{i}")))
        while len(queue.submitted) == i:
            await asyncio.sleep(0.001)
        service.on_issued(CertificateIssued(request_id=queue.submitted[-1].request_id, serial=f"0{i}",
                                            issuer="issuing-1", certificate_pem="c", chain_pem="p", not_before=NOW,
                                            not_after=NOW))
        assert (await task).status is RequestStatus.ISSUED
    assert [key for _, key in service._answered] == ["k1", "k2"]
