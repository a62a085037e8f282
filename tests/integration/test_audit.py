"""The audit log on real NATS, MariaDB and SoftHSM: every state change is appended, the active CARA member chains
the entries under its epoch, and `hapki audit verify` passes on an untouched log and names each kind of tampering."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiomysql
import pytest

from hapki.cara.audit_sealer import seal, sign_head
from hapki.cara.main import CaraRuntime
from hapki.cli.client import ClmClient
from hapki.contracts.errors import ErrorCode, FencedOut
from hapki.contracts.models import IssueCertificate, IssueReply, RequestStatus, RevocationReason, RevokeCertificate
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.audit import AuditKind, AuditRecord, append, append_many, link_hash, record_from_row
from hapki.runtime.audit_verify import AuditReport, Problem, verify_database
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database, db_time
from helpers.csr import make_csr, make_key
from integration.conftest import own_statements, query

pytestmark = pytest.mark.integration


def _request(name: str, *, key: str | None = None) -> IssueCertificate:
    csr_pem, _ = make_csr([name], key=make_key("p256", fresh=True), cn=name)
    return IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="audit-tests",
                            idempotency_key=key or uuid.uuid4().hex)


async def _issue(client: ClmClient, name: str) -> IssueReply:
    reply = await client.issue(_request(name))
    assert reply.error is None and reply.status is RequestStatus.ISSUED, reply
    return reply


async def _settled(sql: aiomysql.Connection, timeout: float = 10.0) -> None:
    """Wait until the sealer chained every entry (none left unchained)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await query(sql, "SELECT COUNT(*) FROM audit_unsealed"))[0][0]:
        assert loop.time() < deadline, "the sealer did not chain the entries"
        await asyncio.sleep(0.05)


async def _signed(sql: aiomysql.Connection, timeout: float = 10.0) -> int:
    """Wait until every entry is chained and a signed checkpoint covers the head; return the head's seq."""
    await _settled(sql, timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = (await query(sql, "SELECT h.seq, (SELECT MAX(seq) FROM audit_checkpoints) FROM audit_head h"))[0]
        if row[0] == row[1]:
            return row[0]
        assert loop.time() < deadline, f"no checkpoint of the head: {row}"
        await asyncio.sleep(0.05)


async def _verify(db: Database) -> AuditReport:
    return await verify_database(db, now=utcnow())


async def _kinds(sql: aiomysql.Connection) -> Counter[str]:
    return Counter(row[0] for row in await query(sql, "SELECT kind FROM audit_entries"))


@pytest.fixture
def config_file(env: LocalEnv, tmp_path: Path) -> Path:
    return stack.write_config(stack.cara_config(env), tmp_path / "cara.toml")


def _cli_verify(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*stack.hapki_command(), "audit", "verify", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env={**os.environ})


async def test_every_state_change_is_appended_and_chained(env, services, client, sql, config_file) -> None:
    cara, _ = services
    before = await _kinds(sql)
    # The CA ceremony (hapki ca init) and the member becoming active are audited too.
    assert before[AuditKind.ISSUER_CREATED.value] == 1 and before[AuditKind.OCSP_SIGNER_CREATED.value] == 1, before
    assert before[AuditKind.EPOCH_CHANGED.value] >= 1, before

    first = await _issue(client, "audit-1.example.com")
    await _issue(client, "audit-2.example.com")
    revoked = await client.revoke(RevokeCertificate(serial=first.serial, reason=RevocationReason.KEY_COMPROMISE,
                                                    requester="alice"))
    assert revoked.error is None, revoked
    # A well-formed request refused by policy is audited once, however often it is sent; garbage is not audited.
    forbidden = _request("www.evil.invalid", key="same")
    for _ in range(3):
        reply = await client.issue(forbidden)
        assert reply.error is not None and reply.error.code is ErrorCode.FORBIDDEN_NAME, reply
    garbage = IssueCertificate(csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                               profile="tls-server", requester="audit-tests")
    reply = await client.issue(garbage)
    assert reply.error is not None and reply.error.code is ErrorCode.MALFORMED_CSR, reply
    # The revocation makes a full CRL listing it, then a delta.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not (await query(sql, "SELECT 1 FROM crls c JOIN revocations r ON r.serial = %s"
                                " WHERE c.crl_number > r.crl_number AND c.is_delta = 1", (first.serial,))):
        assert loop.time() < deadline, "no full and delta CRL after the revocation"
        await asyncio.sleep(0.1)

    await _settled(sql)
    added = await _kinds(sql) - before
    assert added[AuditKind.REQUEST_RECORDED.value] == 2, added
    assert added[AuditKind.CERTIFICATE_ISSUED.value] == 2, added
    assert added[AuditKind.CERTIFICATE_REVOKED.value] == 1, added
    assert added[AuditKind.REQUEST_REJECTED.value] == 1, added
    assert added[AuditKind.CRL_PUBLISHED.value] >= 2, added
    issued = await query(sql, "SELECT epoch, issuer, actor FROM audit_entries WHERE kind = 'certificate.issued'"
                              " AND serial = %s", (first.serial,))
    assert issued == [(cara.signer.epoch, "issuing-1", "cara:cara-1")]
    rejected = await query(sql, "SELECT detail FROM audit_entries WHERE kind = 'request.rejected'")
    assert '"code":"FORBIDDEN_NAME"' in rejected[0][0]

    # One chain: consecutive seq numbers over every entry, sealed under the current epoch, and the head at its end.
    total = (await query(sql, "SELECT COUNT(*) FROM audit_entries"))[0][0]
    chain = await query(sql, "SELECT MIN(seq), MAX(seq), COUNT(*) FROM audit_chain")
    assert chain == [(1, total, total)]
    assert await query(sql, "SELECT seq FROM audit_head") == [(total,)]
    # The head is signed by the audit signer's HSM key (made by `hapki ca init`).
    assert await _signed(sql) == total
    assert await query(sql, "SELECT COUNT(*) FROM audit_signers") == [(1,)]
    report = await _verify(cara.db)
    assert report.ok and report.sealed == total and report.signed_seq == total, report.summary()
    done = _cli_verify(config_file)
    assert done.returncode == 0 and "audit chain intact" in done.stdout, done.stdout + done.stderr


async def test_concurrent_writers_share_one_gapless_chain(services, client, sql) -> None:
    cara, _ = services
    issuing = asyncio.gather(*(client.issue(_request(f"many-{i}.example.com")) for i in range(40)))
    # Verification while the sealer works reads one snapshot: never a false break.
    reports = []
    while not issuing.done():
        reports.append(await _verify(cara.db))
    replies = await issuing
    assert all(r.status is RequestStatus.ISSUED for r in replies), replies
    assert reports and all(r.ok for r in reports), [r.summary() for r in reports if not r.ok]
    await _settled(sql)
    total = (await query(sql, "SELECT COUNT(*) FROM audit_entries"))[0][0]
    assert await query(sql, "SELECT COUNT(*), MAX(seq) FROM audit_chain") == [(total, total)]
    assert (await _verify(cara.db)).ok


@contextlib.asynccontextmanager
async def _sealer_paused(cara: CaraRuntime) -> AsyncIterator[None]:
    """No new entries and no sealing while a test tampers (the signer inactive: the sealer idles)."""
    await cara.signer.stop()
    try:
        yield
    finally:
        await cara.signer.start()


async def _link(sql: aiomysql.Connection, seq: int) -> tuple:
    rows = await query(sql, "SELECT seq, entry_id, prev_hash, hash, epoch, sealed_at FROM audit_chain WHERE seq = %s",
                       (seq,))
    return rows[0]


async def _entry(sql: aiomysql.Connection, entry_id: str) -> tuple:
    rows = await query(sql, "SELECT id, kind, actor, epoch, request_id, issuer, serial, detail, created_at"
                            " FROM audit_entries WHERE id = %s", (entry_id,))
    return rows[0]


async def _restore_entry(sql: aiomysql.Connection, row: tuple) -> None:
    await query(sql, "REPLACE INTO audit_entries (id, kind, actor, epoch, request_id, issuer, serial, detail,"
                     " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", row)


async def _restore_link(sql: aiomysql.Connection, row: tuple) -> None:
    await query(sql, "REPLACE INTO audit_chain (seq, entry_id, prev_hash, hash, epoch, sealed_at)"
                     " VALUES (%s, %s, %s, %s, %s, %s)", row)


def _first(report: AuditReport) -> tuple[int, Problem]:
    assert not report.ok, "tampering went unnoticed"
    return report.findings[0].seq, report.findings[0].problem


async def test_each_kind_of_tampering_is_named(services, client, sql, config_file) -> None:
    cara, _ = services
    await _issue(client, "tamper.example.com")
    await _signed(sql)
    async with _sealer_paused(cara):
        head = (await query(sql, "SELECT seq, hash FROM audit_head"))[0]
        last = head[0]
        assert last >= 8 and (await _verify(cara.db)).ok

        # An altered entry.
        link = await _link(sql, 3)
        entry = await _entry(sql, link[1])
        await query(sql, "UPDATE audit_entries SET actor = 'mallory' WHERE id = %s", (link[1],))
        assert _first(await _verify(cara.db)) == (3, Problem.ALTERED)
        done = _cli_verify(config_file)
        assert done.returncode == 1 and "broken at seq 3: altered" in done.stderr, done.stdout + done.stderr
        await _restore_entry(sql, entry)

        # A removed middle entry: the entry row alone, then with its link.
        link = await _link(sql, 4)
        entry = await _entry(sql, link[1])
        await query(sql, "DELETE FROM audit_entries WHERE id = %s", (link[1],))
        assert _first(await _verify(cara.db)) == (4, Problem.REMOVED)
        await query(sql, "DELETE FROM audit_chain WHERE seq = 4")
        assert _first(await _verify(cara.db)) == (4, Problem.REMOVED)
        await _restore_entry(sql, entry)
        await _restore_link(sql, link)

        # Two entries swapped in the chain's order.
        a, b = await _link(sql, 2), await _link(sql, 5)
        await query(sql, "UPDATE audit_chain SET entry_id = 'x' WHERE seq = 2")
        await query(sql, "UPDATE audit_chain SET entry_id = %s WHERE seq = 5", (a[1],))
        await query(sql, "UPDATE audit_chain SET entry_id = %s WHERE seq = 2", (b[1],))
        assert _first(await _verify(cara.db)) == (2, Problem.REORDERED)
        await query(sql, "DELETE FROM audit_chain WHERE seq IN (2, 5)")
        await _restore_link(sql, a)
        await _restore_link(sql, b)

        # The newest entry removed (entry and link): the head still names it.
        link = await _link(sql, last)
        entry = await _entry(sql, link[1])
        await query(sql, "DELETE FROM audit_chain WHERE seq = %s", (last,))
        await query(sql, "DELETE FROM audit_entries WHERE id = %s", (link[1],))
        assert _first(await _verify(cara.db)) == (last, Problem.TRUNCATED)
        done = _cli_verify(config_file)
        assert done.returncode == 1 and f"broken at seq {last}: truncated" in done.stderr, done.stderr
        await _restore_entry(sql, entry)
        await _restore_link(sql, link)

        # The head removed.
        await query(sql, "DELETE FROM audit_head")
        assert _first(await _verify(cara.db)) == (last, Problem.TRUNCATED)
        await query(sql, "INSERT INTO audit_head (id, seq, hash, updated_at) VALUES (1, %s, %s, NOW(6))", head)

        # Rewritten by someone with write access but no HSM: an entry altered and every later hash recomputed, the
        # head too. The hash chain alone is consistent again; the signed checkpoint of the head is not.
        chain = await query(sql, "SELECT seq, entry_id, prev_hash, hash, epoch, sealed_at FROM audit_chain"
                                 " WHERE seq >= 3 ORDER BY seq")
        entry = await _entry(sql, chain[0][1])
        await query(sql, "UPDATE audit_entries SET actor = 'mallory' WHERE id = %s", (chain[0][1],))
        prev = chain[0][2]
        for row in chain:
            record = record_from_row(await _entry(sql, row[1]))
            digest = link_hash(prev, record, row[0], detail=record.detail_json())
            await query(sql, "UPDATE audit_chain SET prev_hash = %s, hash = %s WHERE seq = %s", (prev, digest, row[0]))
            prev = digest
        await query(sql, "UPDATE audit_head SET hash = %s", (prev,))
        report = await _verify(cara.db)
        signed = [row[0] for row in await query(sql, "SELECT seq FROM audit_checkpoints WHERE seq >= 3 ORDER BY seq")]
        assert [(f.seq, f.problem) for f in report.findings] == [(seq, Problem.CHECKPOINT_MISMATCH) for seq in signed]
        assert signed[-1] == last
        await _restore_entry(sql, entry)
        for row in chain:
            await _restore_link(sql, row)
        await query(sql, "UPDATE audit_head SET hash = %s", (head[1],))
        assert (await _verify(cara.db)).ok

        # The newest entry cut off with the head moved back to match: the signed checkpoint still names it. With
        # the checkpoint deleted too, only a head kept elsewhere (--anchor) or the sealer's log shows it.
        link = await _link(sql, last)
        entry = await _entry(sql, link[1])
        checkpoint = (await query(sql, "SELECT * FROM audit_checkpoints WHERE seq = %s", (last,)))[0]
        await query(sql, "DELETE FROM audit_chain WHERE seq = %s", (last,))
        await query(sql, "DELETE FROM audit_entries WHERE id = %s", (link[1],))
        await query(sql, "UPDATE audit_head SET seq = %s, hash = %s", (last - 1, link[2]))
        assert _first(await _verify(cara.db)) == (last, Problem.TRUNCATED)
        await query(sql, "DELETE FROM audit_checkpoints WHERE seq = %s", (last,))
        assert (await _verify(cara.db)).ok, "undetectable from the database alone: documented"
        anchored = await verify_database(cara.db, now=utcnow(), anchor=head)
        assert [f.problem for f in anchored.findings] == [Problem.ANCHOR_MISMATCH]
        await _restore_entry(sql, entry)
        await _restore_link(sql, link)
        await query(sql, "INSERT INTO audit_checkpoints VALUES (%s, %s, %s, %s, %s, %s, %s)", checkpoint)
        await query(sql, "UPDATE audit_head SET seq = %s, hash = %s", head)

        # Everything put back exactly: intact again (so the checks above can only have failed for the tampering).
        assert (await _verify(cara.db)).ok
    assert _cli_verify(config_file).returncode == 0


async def test_a_stale_epoch_cannot_seal(env, services, sql) -> None:
    cara, _ = services
    await _settled(sql)
    async with _sealer_paused(cara):
        stale = cara.signer.epoch
        # Another member becomes active meanwhile (and goes quiet again).
        other = CaraRuntime(stack.cara_config(env, member="cara-2"))
        current = await other.start()
        await other.signer.stop()
        try:
            record = AuditRecord(kind=AuditKind.REQUEST_RECORDED, actor="test", created_at=utcnow(),
                                 detail={"why": "fence test"})

            async def body(cur: aiomysql.Cursor) -> None:
                await append(cur, record)

            await cara.db.run(body, name="test.append")
            with pytest.raises(FencedOut):
                await seal(cara.db, epoch=stale, now=utcnow(), batch=100)
            assert await query(sql, "SELECT COUNT(*) FROM audit_chain WHERE entry_id = %s", (record.id,)) == [(0,)]
            # Under the current epoch the same entry is chained (with the epoch change before it).
            assert (await seal(cara.db, epoch=current, now=utcnow(), batch=100)).chained >= 1
            assert await query(sql, "SELECT epoch FROM audit_chain WHERE entry_id = %s", (record.id,)) == [(current,)]
            # Nor can it sign the new head (no one has: the module's sealer is paused).
            key = cara.audit._sign
            with pytest.raises(FencedOut):
                await sign_head(cara.db, key, epoch=stale, now=utcnow())
            head = (await query(sql, "SELECT seq FROM audit_head"))[0][0]
            assert await sign_head(cara.db, key, epoch=current, now=utcnow()) == head
            assert await query(sql, "SELECT epoch FROM audit_checkpoints WHERE seq = %s", (head,)) == [(current,)]
        finally:
            await other.stop()
    await _settled(sql)
    assert (await _verify(cara.db)).ok


async def test_one_marker_stands_for_a_transactions_entries_and_the_sealer_takes_it_whole(services, sql) -> None:
    """A transaction's entries get one marker listing them (0007); the sealer chains every entry of the markers it
    takes in (created_at, id) order, takes a marker whole even when it lists more than its batch, and only clears a
    marker whose entries are chained already. A one-entry marker is the form every marker had before 0007."""
    cara, _ = services
    await _settled(sql)
    async with _sealer_paused(cara):
        epoch = cara.signer.epoch
        t0 = utcnow()
        group = [AuditRecord(kind=AuditKind.REQUEST_RECORDED, actor="test", created_at=t0 + timedelta(microseconds=n),
                             detail={"n": n}) for n in range(3)]
        single = AuditRecord(kind=AuditKind.REQUEST_RECORDED, actor="test", created_at=t0 - timedelta(milliseconds=1),
                             detail={"n": "single"})

        async def write(cur: aiomysql.Cursor) -> None:
            await append_many(cur, group[::-1])  # appended newest first: the chain must still be in creation order
            await append(cur, single)

        await cara.db.run(write, name="test.append")
        markers = await query(sql, "SELECT entry_id, created_at, entry_ids FROM audit_unsealed ORDER BY created_at")
        assert markers == [(single.id, db_time(single.created_at), None),
                           (group[2].id, db_time(group[0].created_at), ",".join(r.id for r in group[::-1]))]

        with own_statements() as statements:
            first = await seal(cara.db, epoch=epoch, now=utcnow(), batch=2)
        assert first == (1, True), "the single (oldest) marker; the group of 3 would exceed the batch of 2"
        # The head and the markers; their entries; the links, head, markers' deletion after the fence, and COMMIT.
        assert len(statements) == 3, statements
        assert await seal(cara.db, epoch=epoch, now=utcnow(), batch=2) == (3, False), "a marker is taken whole"
        seqs = await query(sql, "SELECT entry_id, seq FROM audit_chain WHERE entry_id IN (%s, %s, %s, %s) ORDER BY seq",
                           (single.id, *(r.id for r in group)))
        assert [entry for entry, _ in seqs] == [single.id, *(r.id for r in group)]
        assert seqs[-1][1] - seqs[0][1] == 3
        assert await query(sql, "SELECT COUNT(*) FROM audit_unsealed") == [(0,)]

        # A marker for entries chained already (a writer's retried commit that had gone through): only cleared.
        await query(sql, "INSERT INTO audit_unsealed (entry_id, created_at, entry_ids) VALUES (%s, %s, %s)",
                    markers[1])
        assert await seal(cara.db, epoch=epoch, now=utcnow(), batch=100) == (0, False)
        assert await query(sql, "SELECT COUNT(*) FROM audit_unsealed") == [(0,)]
        assert await query(sql, "SELECT COUNT(*) FROM audit_chain WHERE entry_id = %s", (group[0].id,)) == [(1,)]
    assert (await _verify(cara.db)).ok


async def test_an_idle_sealer_writes_nothing(services, sql) -> None:
    """With no marker waiting, a tick reads once and commits no fence (a write every Galera node would apply, four
    times a second); with one waiting, it chains it under the fence."""
    cara, _ = services
    await _signed(sql)  # nothing to chain, and the head has its checkpoint
    async with _sealer_paused(cara):
        epoch = cara.signer.epoch

        async def fence_seq() -> int:
            return (await query(sql, "SELECT fence_seq FROM epochs WHERE tier = 'cara'"))[0][0]

        before = await fence_seq()
        for _ in range(3):
            assert await cara.audit.tick(epoch) == 0
        assert await fence_seq() == before, "an idle tick wrote the fence"
        record = AuditRecord(kind=AuditKind.REQUEST_RECORDED, actor="test", created_at=utcnow(), detail={"n": "idle"})

        async def write(cur: aiomysql.Cursor) -> None:
            await append(cur, record)

        await cara.db.run(write, name="test.append")
        assert await cara.audit.tick(epoch) == 1
        assert await fence_seq() > before
        assert await query(sql, "SELECT COUNT(*) FROM audit_chain WHERE entry_id = %s", (record.id,)) == [(1,)]


async def test_the_chain_verifies_after_a_failover_under_load(env, services, client, sql) -> None:
    """A split brain under load: the other member bumps the epoch while requests flow; the old one is fenced."""
    old, _ = services
    load = [asyncio.create_task(client.issue(_request(f"fo-{i}.example.com"))) for i in range(20)]
    await asyncio.sleep(0.05)
    new = CaraRuntime(stack.cara_config(env, member="cara-2"))
    new_epoch = await new.start()
    try:
        load += [asyncio.create_task(client.issue(_request(f"fo2-{i}.example.com"))) for i in range(20)]
        replies = await asyncio.wait_for(asyncio.gather(*load), timeout=60)
        assert all(r.status is RequestStatus.ISSUED for r in replies), [r for r in replies if r.error]
        await _settled(sql)
        report = await _verify(new.db)
        assert report.ok, report.summary()
        # Only the current epoch extends the chain once it exists: links sealed after the change carry it.
        change = await query(sql, "SELECT MIN(c.seq) FROM audit_chain c JOIN audit_entries e ON e.id = c.entry_id"
                                  " WHERE e.kind = 'epoch.changed' AND e.epoch = %s", (new_epoch,))
        assert await query(sql, "SELECT COUNT(*) FROM audit_chain WHERE seq > %s AND epoch < %s",
                           (change[0][0], new_epoch)) == [(0,)]
    finally:
        await new.stop()
        await old.signer.stop()
        await old.signer.start()  # the module's member active again for whatever follows
    await _settled(sql)
    assert (await _verify(old.db)).ok


def test_verify_refuses_a_bad_anchor(config_file: Path) -> None:
    done = subprocess.run([*stack.hapki_command(), "audit", "verify", "--config", str(config_file), "--anchor", "x"],
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    assert done.returncode == 2 and "--anchor takes SEQ:HASH" in done.stderr, done.stderr


async def test_ca_init_adds_an_audit_signer_to_a_ca_from_before_the_audit_log(services, sql, config_file) -> None:
    cara, _ = services
    old = await query(sql, "SELECT issuer, key_id, cert_pem, not_after, created_at, serial FROM audit_signers")
    await query(sql, "DELETE FROM audit_signers")
    try:
        done = subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(config_file)],
                              capture_output=True, text=True, timeout=120, env={**os.environ})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "created audit signer for 'issuing-1'" in done.stdout and "ocsp" not in done.stdout, done.stdout
        again = subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(config_file)],
                               capture_output=True, text=True, timeout=120, env={**os.environ})
        assert "nothing to do" in again.stdout, again.stdout + again.stderr
        assert "OCSP responder certificate ends" in again.stdout and "renews it when 30 days are left" in again.stdout
    finally:
        for row in old:  # the running member still signs with its key: keep it trusted
            await query(sql, "INSERT INTO audit_signers (issuer, key_id, cert_pem, not_after, created_at, serial)"
                             " VALUES (%s, %s, %s, %s, %s, %s)", row)
    assert await query(sql, "SELECT COUNT(*) FROM audit_entries WHERE kind = 'audit_signer.created'") == [(2,)]
    await _signed(sql)
    assert (await _verify(cara.db)).ok
