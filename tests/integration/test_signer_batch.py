"""The batched signing path against real NATS, MariaDB and SoftHSM.

Each test publishes approved (and recorded) signing requests into the real stream, fetches them through the real
durable consumer, and hands them to a signer as one batch, so the batch's make-up is known; the last test lets the
signer's own fetch loop form the batch. Failures are injected at the edges only: a competing epoch bump (another
member becoming active), a serial source that repeats a stored serial, an HSM key whose n-th signature fails.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.cara.config import SignerConfig
from hapki.cara.issuance import random_serial, serial_hex
from hapki.cara.main import CaraRuntime
from hapki.cara.ports import Intent, IssuedRecord, IssuerRecord
from hapki.cara.signer import Signer
from hapki.cara.store import MariaDBSigningStore
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode, HSMUnavailable
from hapki.contracts.models import CertificateIssued, ErrorBody, IssueCertificate, SignCertificate
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.clock import utcnow
from hapki.runtime.hsm_key import HSMPrivateKey
from hapki.runtime.ids import time_ordered_id
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve
from helpers.certs import self_signed_ca
from helpers.csr import make_csr, make_key
from helpers.signing import recorded_request
from integration.conftest import own_statements, query
from telemetry_fixture import memory_exporter

pytestmark = pytest.mark.integration

PROFILES = load_profiles(SHIPPED_PROFILES_PATH)


@pytest.fixture(scope="module")
async def cara(env: LocalEnv) -> AsyncIterator[CaraRuntime]:
    """CARA's connections, HSM pool and issuer, its own signer left passive: the tests bring their signers."""
    memory_exporter()
    runtime = CaraRuntime(stack.cara_config(env))
    await runtime.open()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def bus(env: LocalEnv) -> AsyncIterator[tuple[Any, list[CertificateIssued]]]:
    """A connection with CLM's rights (publishes signing requests) and the CertificateIssued events seen."""
    nc = await nats.connect(**env.nats.connect_kwargs("clm"))
    issued: list[CertificateIssued] = []

    async def on_issued(msg: Any) -> None:
        issued.append(CertificateIssued.model_validate_json(msg.data))

    await nc.subscribe(subjects.CARA_ISSUED, cb=on_issued)
    try:
        yield nc, issued
    finally:
        await nc.close()


def _content(name: str) -> SignCertificate:
    csr_pem, _ = make_csr([name], key=make_key("p256", fresh=True), cn=name)
    return approve(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="batch-tests"), PROFILES,
                   uuid.uuid4().hex)


async def _recorded(env: LocalEnv, store: MariaDBRequestStore, name: str) -> SignCertificate:
    """A request as CLM records and approves it."""
    return await recorded_request(stack.approval_keys(env.base_dir / "approval")[0], store, name, "batch-tests")


async def _publish(nc: Any, request: SignCertificate, msg_id: str | None = None) -> None:
    await nc.jetstream().publish(subjects.CARA_SIGN, request.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": msg_id or request.request_id})


async def _fetch(cara: CaraRuntime, n: int) -> list[Any]:
    """Exactly n messages from the signing consumer, as the signer's pull request gets them."""
    assert cara.nc is not None
    psub = await cara.nc.jetstream().pull_subscribe_bind(durable=subjects.SIGNING_CONSUMER,
                                                         stream=subjects.SIGNING_STREAM)
    msgs: list[Any] = []
    try:
        while len(msgs) < n:
            msgs += await psub.fetch(n - len(msgs), timeout=5)
    finally:
        await psub.unsubscribe()
    return msgs


async def _queued(env: LocalEnv, store: MariaDBRequestStore, nc: Any, cara: CaraRuntime, prefix: str,
                  n: int) -> tuple[list[SignCertificate], list[Any]]:
    """n requests recorded and approved as CLM does, published, and fetched as one batch of messages."""
    requests = [await _recorded(env, store, f"{prefix}-{i}.example.com") for i in range(n)]
    for request in requests:
        await _publish(nc, request)
    return requests, await _fetch(cara, n)


async def _signer(cara: CaraRuntime, *, store: MariaDBSigningStore | None = None, key: Any = None,
                  serials: Callable[[], int] | None = None, active: bool = False,
                  config: SignerConfig | None = None) -> Signer:
    """A signer like the runtime's, with an epoch of its own; passive (for handle_batch) unless `active`."""
    assert cara.db is not None and cara.nc is not None and cara.signer is not None
    cfg = cara.config
    signer = Signer(
        nc=cara.nc, js=cara.nc.jetstream(), store=store or MariaDBSigningStore(cara.db, actor="cara:batch-tests"),
        issuer=cara.signer.issuer, issuer_key=key or cara.signer.issuer_key, member=cfg.member,
        config=config or cfg.signer,
        clock=utcnow, approvals=ApprovalVerifier.from_files(cfg.approval_public_keys), profiles=PROFILES,
        **({"serials": serials} if serials else {}),
    )
    await signer.start()
    if not active:
        await signer.stop()  # the epoch stays ours until someone bumps it
    return signer


async def _settled(msgs: list[Any], timeout: float = 10.0) -> None:
    """Wait until every message was acked, NAKed or termed by the signer (a fenced hand-back runs in a task)."""
    for _ in range(int(timeout / 0.02)):
        if all(msg.is_acked for msg in msgs):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not every message of the batch was settled")


async def _certificates(sql: Any, requests: list[SignCertificate]) -> dict[str, tuple]:
    ids = [r.request_id for r in requests]
    rows = await query(sql, f"SELECT request_id, serial, intent_id, cert_pem FROM certificates WHERE request_id IN"
                            f" ({', '.join(['%s'] * len(ids))})", ids)
    return {row[0]: row[1:] for row in rows}


async def _wait_issued(sql: Any, requests: list[SignCertificate], timeout: float = 20.0) -> dict[str, tuple]:
    for _ in range(int(timeout / 0.1)):
        found = await _certificates(sql, requests)
        if len(found) == len(requests):
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {len(found)} of {len(requests)} requests were issued")


# Reads of the runtime's background tasks, not of the signing path (the OCSP responder's certificate, checked at
# open and every few minutes): a check that falls in a test's window is not one of the batch's transactions.
_BACKGROUND = {"cara.ocsp_signer"}


def _cara_transactions(exporter: Any) -> list[str]:
    return [s.attributes["db.txn"] for s in exporter.get_finished_spans()
            if s.name == "db.commit" and str(s.attributes.get("db.txn", "")).startswith("cara.")
            and s.attributes["db.txn"] not in _BACKGROUND]


async def test_a_batch_gets_one_certificate_per_request_with_unique_serials_in_two_round_trips(
        env, cara, clm_store, bus, sql) -> None:
    nc, events = bus
    signer = await _signer(cara)
    requests, msgs = await _queued(env, clm_store, nc, cara, "batch", 8)
    exporter = memory_exporter()
    exporter.clear()

    with own_statements() as statements:
        await signer.handle_batch(msgs)

    # The reservation's fence checks that nothing is stored for these requests (no outcome read before it), and
    # the store's checks that every intent was still reserved: each transaction is one round trip.
    assert _cara_transactions(exporter) == ["cara.reserve_fresh", "cara.record_issued"]
    assert len(statements) == 2, statements
    assert all(msg.is_acked for msg in msgs)
    assert signer.signatures == len(requests)
    stored = await _certificates(sql, requests)
    assert set(stored) == {r.request_id for r in requests}
    assert len({serial for serial, _, _ in stored.values()}) == len(requests)
    for request in requests:
        serial, intent_id, cert_pem = stored[request.request_id]
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        assert format(cert.serial_number, "x") == serial and cert.subject.rfc4514_string() == f"CN={request.common_name}"
        assert await query(sql, "SELECT id, state FROM signing_intents WHERE request_id = %s",
                           (request.request_id,)) == [(intent_id, "issued")]
        assert await query(sql, "SELECT status, serial FROM requests WHERE id = %s",
                           (request.request_id,)) == [("issued", serial)]
        assert await query(sql, "SELECT serial FROM audit_entries WHERE request_id = %s AND kind = 'certificate.issued'",
                           (request.request_id,)) == [(serial,)]
    # The commit-order stamp covers the whole batch (one fenced commit).
    stamps = await query(sql, f"SELECT DISTINCT fence_seq FROM certificates WHERE request_id IN"
                              f" ({', '.join(['%s'] * len(requests))})", [r.request_id for r in requests])
    assert len(stamps) == 1 and stamps[0][0] is not None
    for _ in range(100):
        if {e.request_id for e in events} >= {r.request_id for r in requests}:
            break
        await asyncio.sleep(0.05)
    assert {e.request_id: e.serial for e in events} == {r.request_id: stored[r.request_id][0] for r in requests}


async def test_a_mixed_batch_settles_each_request_on_its_own(env, cara, clm_store, bus, sql) -> None:
    """Forged, already issued (redelivered) and good requests in one batch: each gets what it would alone."""
    nc, events = bus
    signer = await _signer(cara)
    earlier = await _recorded(env, clm_store, "earlier.example.com")
    await _publish(nc, earlier)
    await signer.handle_batch(await _fetch(cara, 1))
    [(serial, intent_id, _)] = (await _certificates(sql, [earlier])).values()

    forged = _content("forged-in-batch.example.com")  # never approved by CLM, never recorded
    good = [await _recorded(env, clm_store, f"mixed-{i}.example.com") for i in range(3)]
    await _publish(nc, good[0])
    await _publish(nc, forged)
    await _publish(nc, earlier, msg_id=f"{earlier.request_id}-redelivered")  # past JetStream's de-duplication
    await _publish(nc, good[1])
    await _publish(nc, good[2])
    msgs = await _fetch(cara, 5)
    signatures = signer.signatures
    exporter = memory_exporter()
    exporter.clear()

    await signer.handle_batch(msgs)

    assert all(msg.is_acked for msg in msgs)  # acked, or termed (the forgery)
    assert signer.signatures == signatures + len(good)
    # The redelivered request fails the one-round-trip reservation's guard; the outcomes are read, the rest reserved.
    assert [t for t in _cara_transactions(exporter) if t != "cara.refuse"] == [
        "cara.reserve_fresh", "cara.outcome", "cara.reserve", "cara.record_issued"]
    assert len(await _wait_issued(sql, good)) == len(good)
    # The forgery: refused and audited; nothing reserved or signed for it.
    refused = await query(sql, "SELECT detail FROM audit_entries WHERE request_id = %s AND kind = 'signing.refused'",
                          (forged.request_id,))
    assert len(refused) == 1 and "APPROVAL_INVALID" in refused[0][0]
    assert await query(sql, "SELECT id FROM signing_intents WHERE request_id = %s", (forged.request_id,)) == []
    # The redelivery: the stored certificate is republished, nothing reserved or signed again.
    assert await query(sql, "SELECT serial, intent_id FROM certificates WHERE request_id = %s",
                       (earlier.request_id,)) == [(serial, intent_id)]
    assert await query(sql, "SELECT id FROM signing_intents WHERE request_id = %s",
                       (earlier.request_id,)) == [(intent_id,)]
    for _ in range(100):
        if len([e for e in events if e.request_id == earlier.request_id]) == 2:
            break
        await asyncio.sleep(0.05)
    assert [e.serial for e in events if e.request_id == earlier.request_id] == [serial, serial]


async def test_a_fresh_reservation_writes_nothing_where_a_request_has_anything_stored(
        env, cara, clm_store, sql) -> None:
    """reserve_fresh's fence checks what the outcome read and the supersede did before it: a request with a
    certificate, a failed request, a request with a reserved intent. Any of them in the batch: nothing written."""
    assert cara.db is not None and cara.signer is not None
    signer = await _signer(cara)
    assert signer.epoch is not None
    epoch, issuer, now = signer.epoch, cara.signer.issuer.name, utcnow()
    store = MariaDBSigningStore(cara.db, actor="cara:batch-tests")

    def intent(request: SignCertificate) -> Intent:
        return Intent(time_ordered_id(), request.request_id, issuer, format(random_serial(), "x"))

    issued, failed, reserved, fresh = [
        await _recorded(env, clm_store, f"fresh-{kind}-{uuid.uuid4().hex[:8]}.example.com")
        for kind in ("issued", "failed", "reserved", "fresh")]
    first = intent(issued)
    await store.reserve_batch([first], epoch=epoch, member="cara-test", now=now)
    await store.record_issued_batch([IssuedRecord(
        request_id=issued.request_id, issuer=issuer, serial=first.serial, intent_id=first.intent_id,
        cert_pem="(not parsed here)", not_before=now, not_after=now + timedelta(days=1))], epoch=epoch, now=now)
    assert await store.refuse(failed, ErrorBody(code=ErrorCode.POLICY_VIOLATION, message="test"), epoch=epoch,
                              now=now)
    await store.reserve_batch([intent(reserved)], epoch=epoch, member="cara-test", now=now)

    for blocker in (issued, failed, reserved):
        attempt = [intent(fresh), intent(blocker)]
        assert not await store.reserve_fresh(attempt, epoch=epoch, member="cara-test", now=now), blocker
        ids = [i.intent_id for i in attempt]
        assert await query(sql, "SELECT id FROM signing_intents WHERE id IN (%s, %s)", ids) == []
    alone = intent(fresh)
    assert await store.reserve_fresh([alone], epoch=epoch, member="cara-test", now=now)
    assert await query(sql, "SELECT id, state FROM signing_intents WHERE request_id = %s",
                       (fresh.request_id,)) == [(alone.intent_id, "reserved")]

    # The store's guard: an intent superseded after it was reserved (a newer attempt) is not stored.
    newer = intent(fresh)
    await store.reserve_batch([newer], epoch=epoch, member="cara-test", now=now)
    assert await store.record_issued_batch([IssuedRecord(
        request_id=fresh.request_id, issuer=issuer, serial=alone.serial, intent_id=alone.intent_id,
        cert_pem="(not parsed here)", not_before=now, not_after=now + timedelta(days=1))],
        epoch=epoch, now=now) == [None]
    assert await _certificates(sql, [fresh]) == {}
    assert sorted(await query(sql, "SELECT id, state FROM signing_intents WHERE request_id = %s",
                              (fresh.request_id,))) == sorted([(alone.intent_id, "abandoned"),
                                                               (newer.intent_id, "reserved")])


class _FencedAtCommit(MariaDBSigningStore):
    """The real store; another member becomes active (bumps the epoch) just before this batch commits."""

    async def record_issued_batch(self, records: list[IssuedRecord], *, epoch: int,
                                  now: datetime) -> list[IssuedRecord | None]:
        await MariaDBSigningStore(self._db).bump_epoch("cara-2", now)
        return await super().record_issued_batch(records, epoch=epoch, now=now)


@pytest.mark.parametrize("stage", ["reserve", "commit"])
async def test_a_batch_fenced_midway_hands_every_message_back(env, cara, clm_store, bus, sql, stage: str) -> None:
    nc, _ = bus
    assert cara.db is not None
    store = _FencedAtCommit(cara.db) if stage == "commit" else MariaDBSigningStore(cara.db)
    signer = await _signer(cara, store=store)
    old_epoch = signer.epoch
    requests, msgs = await _queued(env, clm_store, nc, cara, f"fenced-{stage}", 4)
    if stage == "reserve":
        await MariaDBSigningStore(cara.db).bump_epoch("cara-2", utcnow())

    await signer.handle_batch(msgs)
    await _settled(msgs)  # NAKed, not acked: nothing of the batch was committed

    assert signer.fenced.is_set() and not signer.active
    assert await _certificates(sql, requests) == {}
    ids = [r.request_id for r in requests]
    intents = await query(sql, f"SELECT epoch, state FROM signing_intents WHERE request_id IN"
                               f" ({', '.join(['%s'] * len(ids))})", ids)
    assert signer.signatures == (len(requests) if stage == "commit" else 0)
    assert intents == ([(old_epoch, "reserved")] * len(requests) if stage == "commit" else [])

    # The member that is active now gets every message and issues each request once; our intents are resolved.
    successor = await _signer(cara, active=True)
    try:
        stored = await _wait_issued(sql, requests)
    finally:
        await successor.stop()
    assert len({serial for serial, _, _ in stored.values()}) == len(requests)
    states = await query(sql, f"SELECT epoch, state FROM signing_intents WHERE request_id IN"
                              f" ({', '.join(['%s'] * len(ids))}) ORDER BY epoch", ids)
    assert sorted(states) == sorted([(old_epoch, "abandoned")] * len(intents)
                                    + [(successor.epoch, "issued")] * len(requests))


class _IssuedMeanwhile(MariaDBSigningStore):
    """The real store; just before this batch commits, another attempt stores a certificate for its first request
    (a redelivered copy handled by another process, say)."""

    winner: IssuedRecord | None = None

    async def record_issued_batch(self, records: list[IssuedRecord], *, epoch: int,
                                  now: datetime) -> list[IssuedRecord | None]:
        first = records[0]
        # A serial as the CA draws them: a uuid's hex could start with 0, which no drawn serial's does, and was then
        # the smallest in `certificates`, which the collision test below takes to repeat (and did not collide).
        winner = IssuedRecord(request_id=first.request_id, issuer=first.issuer, serial=serial_hex(random_serial()),
                              intent_id=uuid.uuid4().hex, cert_pem=first.cert_pem, not_before=first.not_before,
                              not_after=first.not_after)
        other = MariaDBSigningStore(self._db, actor="cara:other")
        await other.reserve(intent_id=winner.intent_id, request_id=winner.request_id, issuer=winner.issuer,
                            serial=winner.serial, epoch=epoch, member="cara-other", now=now)
        self.winner = await other.record_issued(winner, epoch=epoch, now=now)
        return await super().record_issued_batch(records, epoch=epoch, now=now)


async def test_a_request_another_intent_issued_meanwhile_keeps_that_certificate(env, cara, clm_store, bus,
                                                                               sql) -> None:
    """At most one certificate per request: the batch stores the others and answers that one with the winner's."""
    nc, events = bus
    assert cara.db is not None
    store = _IssuedMeanwhile(cara.db)
    signer = await _signer(cara, store=store)
    requests, msgs = await _queued(env, clm_store, nc, cara, "meanwhile", 3)

    await signer.handle_batch(msgs)

    assert all(msg.is_acked for msg in msgs)
    winner = store.winner
    assert winner is not None
    stored = await _certificates(sql, requests)
    assert len(stored) == 3 and stored[winner.request_id][:2] == (winner.serial, winner.intent_id)
    intents = await query(sql, "SELECT id, state, resolution FROM signing_intents WHERE request_id = %s",
                          (winner.request_id,))
    [(ours, state, resolution)] = [row for row in intents if row[0] != winner.intent_id]
    # The winner's reservation superseded ours (on one node; a race across Galera nodes ends in "request already
    # issued by another intent" instead): either way ours is abandoned, once, and never stored.
    assert state == "abandoned" and resolution in ("superseded by a new attempt for the request",
                                                   "request already issued by another intent")
    assert await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind = 'intent.abandoned' AND detail LIKE %s",
                       (f"%{ours}%",)) == [(1,)]
    for _ in range(100):
        if {e.request_id for e in events} >= {r.request_id for r in requests}:
            break
        await asyncio.sleep(0.05)
    assert [e.serial for e in events if e.request_id == winner.request_id] == [winner.serial]


class _FailsOnce(HSMPrivateKey):
    """The real HSM key, except that its n-th signature fails as a dead HSM pool does (HSMUnavailable)."""

    def __init__(self, key: HSMPrivateKey, fail_at: int) -> None:
        super().__init__(key._signer, key.key_id, key.public_key())  # noqa: SLF001 (the same HSM pool)
        self.calls, self._fail_at = 0, fail_at

    def sign(self, data: bytes, signature_algorithm: Any) -> bytes:
        self.calls += 1
        if self.calls == self._fail_at:
            raise HSMUnavailable("no HSM member could sign", {"members": {"hsm-a": "down"}})
        return super().sign(data, signature_algorithm)


async def test_an_hsm_failure_on_one_request_abandons_only_its_intent(env, cara, clm_store, bus, sql) -> None:
    nc, _ = bus
    assert cara.signer is not None
    key = _FailsOnce(cara.signer.issuer_key, fail_at=2)  # type: ignore[arg-type]
    signer = await _signer(cara, key=key)
    requests, msgs = await _queued(env, clm_store, nc, cara, "hsm", 4)

    await signer.handle_batch(msgs)

    assert all(msg.is_acked for msg in msgs)  # three acked, one NAKed
    stored = await _certificates(sql, requests)
    [failed] = [r for r in requests if r.request_id not in stored]
    assert len(stored) == 3 and signer.signatures == 3
    [(intent_id, state, resolution)] = await query(
        sql, "SELECT id, state, resolution FROM signing_intents WHERE request_id = %s", (failed.request_id,))
    assert (state, resolution) == ("abandoned", "HSM failed; no signature made")
    assert await query(sql, "SELECT request_id FROM audit_entries WHERE kind = 'intent.abandoned' AND detail LIKE %s",
                       (f'%{intent_id}%',)) == [(failed.request_id,)]
    assert await query(sql, "SELECT status FROM requests WHERE id = %s", (failed.request_id,)) == [("pending",)]

    # The NAKed request comes back and is issued (once) by a signer whose HSM works.
    successor = await _signer(cara, active=True)
    try:
        [(serial, new_intent, _)] = (await _wait_issued(sql, [failed])).values()
    finally:
        await successor.stop()
    assert new_intent != intent_id


async def test_a_serial_collision_draws_again_without_losing_the_batch(env, cara, clm_store, bus, sql) -> None:
    nc, _ = bus
    taken = (await query(sql, "SELECT serial FROM certificates LIMIT 1"))[0][0]
    assert serial_hex(int(taken, 16)) == taken  # drawn as the CA draws serials: the repeat collides
    draws = iter([int(taken, 16)])

    def serials() -> int:  # the first draw repeats a stored serial; the rest come from the CSPRNG
        return next(draws, None) or random_serial()

    signer = await _signer(cara, serials=serials)
    requests, msgs = await _queued(env, clm_store, nc, cara, "collide", 3)
    exporter = memory_exporter()
    exporter.clear()

    await signer.handle_batch(msgs)

    assert all(msg.is_acked for msg in msgs)
    # The collision fails the reservation (its fence had found nothing stored for the requests, so it cannot be our
    # own earlier commit: that would have failed the fence's guard first); new serials go through.
    assert _cara_transactions(exporter) == ["cara.reserve_fresh", "cara.reserve_fresh", "cara.record_issued"]
    stored = await _certificates(sql, requests)
    assert len(stored) == len(requests) and taken not in {serial for serial, _, _ in stored.values()}
    assert await query(sql, "SELECT COUNT(*) FROM signing_intents WHERE serial = %s", (taken,)) == [(1,)]


async def test_the_fetch_loop_takes_what_waits_in_the_stream_as_one_batch(env, cara, clm_store, bus, sql) -> None:
    nc, _ = bus
    requests = [await _recorded(env, clm_store, f"queued-{i}.example.com") for i in range(12)]
    for request in requests:  # queued while no signer is active
        await _publish(nc, request)
    signer = await _signer(cara, active=True)
    try:
        stored = await _wait_issued(sql, requests)
    finally:
        await signer.stop()
    assert signer.batches[0] == len(requests)
    # One UPDATE marked the whole batch's requests: each with its own certificate's serial, the issuer, not_after.
    ids = [r.request_id for r in requests]
    rows = await query(sql, "SELECT r.id, r.status, r.serial, r.issuer = c.issuer, r.not_after = c.not_after"
                            " FROM requests r JOIN certificates c ON c.request_id = r.id"
                            f" WHERE r.id IN ({', '.join(['%s'] * len(ids))})", ids)
    assert sorted(rows) == sorted((i, "issued", stored[i][0], 1, 1) for i in ids)


async def test_a_lone_request_is_signed_while_the_long_poll_is_still_open(env, cara, clm_store, bus, sql) -> None:
    """Low load: a fetch returns with the first message; it never waits for the batch to fill or the poll to end."""
    nc, _ = bus
    signer = await _signer(cara, active=True, config=SignerConfig(batch=64, fetch_timeout_seconds=60.0))
    try:
        for i in range(3):  # one at a time, each while the signer's 60 s pull request is open
            [request] = [await _recorded(env, clm_store, f"lone-{i}.example.com")]
            await _publish(nc, request)
            await _wait_issued(sql, [request], timeout=10.0)
    finally:
        await signer.stop()
    assert signer.batches == [1, 1, 1]


@pytest.mark.parametrize("fresh", [False, True], ids=["reserve_batch", "reserve_fresh"])
async def test_batches_reserving_at_once_never_deadlock(cara, sql, fresh: bool) -> None:
    """The signer keeps batches in flight together; their reservations run concurrently. Request ids are
    time-ordered, so every new batch's requests fall in the same gap of ix_intents_request: locked by the
    supersede UPDATE under REPEATABLE READ, the two inserts into it deadlocked (InnoDB rolled one back; ~3% of
    reservations at 300/s were retried). Each reservation must go through on its first attempt; reserve_fresh's
    guard reads the same index, under READ COMMITTED too."""
    assert cara.db is not None and cara.signer is not None
    signer = await _signer(cara)
    assert signer.epoch is not None
    store = MariaDBSigningStore(cara.db, actor="cara:batch-tests")
    issuer = cara.signer.issuer.name
    exporter = memory_exporter()
    exporter.clear()
    batches = [[Intent(time_ordered_id(), time_ordered_id(), issuer, format(random_serial(), "x")) for _ in range(16)]
               for _ in range(4 * 40)]
    for round_ in range(40):  # four batches at once, forty times
        reserve = store.reserve_fresh if fresh else store.reserve_batch
        done = await asyncio.gather(*(reserve(batch, epoch=signer.epoch, member="cara-test", now=utcnow())
                                      for batch in batches[4 * round_:4 * round_ + 4]))
        assert done == [True] * 4 if fresh else [None] * 4

    name = "cara.reserve_fresh" if fresh else "cara.reserve"
    reserves = [s for s in exporter.get_finished_spans() if s.attributes.get("db.txn") == name]
    assert len(reserves) == len(batches)
    retries = [dict(e.attributes) for s in reserves for e in s.events if e.name == "retry"]
    assert retries == []
    ids = [intent.request_id for batch in batches for intent in batch]
    rows = await query(sql, f"SELECT request_id, state FROM signing_intents WHERE request_id IN"
                            f" ({', '.join(['%s'] * len(ids))})", ids)
    assert sorted(rows) == sorted((request_id, "reserved") for request_id in ids)


class _RolledOverWhileReserving(MariaDBSigningStore):
    """The real store; right after this batch's reservation commits, the signer is switched to another issuing CA
    (a rollover landing in the middle of a batch)."""

    switch: Callable[[], None] | None = None

    async def reserve_fresh(self, intents: Any, *, epoch: int, member: str, now: datetime) -> bool:
        reserved = await super().reserve_fresh(intents, epoch=epoch, member=member, now=now)
        if self.switch is not None:
            self.switch()
            self.switch = None
        return reserved


def _software_ca(name: str) -> tuple[IssuerRecord, ec.EllipticCurvePrivateKey]:
    cert, key = self_signed_ca(name)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return IssuerRecord(name=name, cert_pem=pem, chain_pem=pem, key_id=b"software"), key


async def test_a_batch_under_way_when_the_issuer_switches_is_signed_and_stored_as_the_one_it_began_with(
        env, cara, clm_store, bus, sql) -> None:
    """A rollover between a batch's reservation and its signatures: the batch's intents, signatures and rows all name
    the CA it reserved under; the next batch is the new CA's."""
    nc, _ = bus
    assert cara.db is not None
    store = _RolledOverWhileReserving(cara.db)
    signer = await _signer(cara, store=store)
    before = signer.issuer
    other, other_key = _software_ca("rolled-over")
    store.switch = lambda: signer.use_issuer(other, other_key, None)
    requests, msgs = await _queued(env, clm_store, nc, cara, "switch", 3)

    await signer.handle_batch(msgs)

    assert all(msg.is_acked for msg in msgs) and signer.issuer == other  # switched, for the next batch
    rows = await query(sql, "SELECT c.issuer, i.issuer, c.cert_pem FROM certificates c JOIN signing_intents i"
                            f" ON i.id = c.intent_id WHERE c.request_id IN ({', '.join(['%s'] * 3)})",
                       [r.request_id for r in requests])
    assert len(rows) == 3
    for stored_as, intent_issuer, pem in rows:
        assert stored_as == intent_issuer == before.name
        x509.load_pem_x509_certificate(pem.encode()).verify_directly_issued_by(before.certificate)


async def test_a_redelivery_after_a_rollover_gets_the_chain_of_the_ca_that_issued_it(env, cara, clm_store, bus,
                                                                                    sql) -> None:
    """Answered from the database, not signed again: the chain in the answer is the stored certificate's CA's,
    not the one the signer issues from now."""
    nc, events = bus
    signer = await _signer(cara)
    before = signer.issuer
    requests, msgs = await _queued(env, clm_store, nc, cara, "redelivered-after-rollover", 1)
    await signer.handle_batch(msgs)
    [request] = requests
    other, other_key = _software_ca("rolled-over")
    signer.use_issuer(other, other_key, None)
    try:
        await _publish(nc, request, msg_id=f"{request.request_id}-again")  # the same request, delivered again
        again = await _fetch(cara, 1)
        await signer.handle_batch(again)
    finally:
        signer.use_issuer(before, cara.signer.issuer_key, None)  # type: ignore[union-attr]
    assert again[0].is_acked and signer.signatures == 1  # answered, not signed again
    for _ in range(100):
        if len([e for e in events if e.request_id == request.request_id]) >= 2:
            break
        await asyncio.sleep(0.05)
    answers = [e for e in events if e.request_id == request.request_id]
    assert len(answers) == 2 and answers[0].serial == answers[1].serial
    assert [e.issuer for e in answers] == [before.name, before.name]
    assert [e.chain_pem for e in answers] == [before.chain_pem, before.chain_pem]
