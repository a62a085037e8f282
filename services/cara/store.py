"""MariaDB adapter of the CA's SigningStore: serial reservation, fenced commits, epochs, recovery."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence, Sized
from dataclasses import replace
from datetime import datetime

import aiomysql
from cryptography import x509

from hapki.contracts.errors import AlreadyRevoked, DuplicateKey, FencedOut, GuardFailed, NotFound
from hapki.contracts.models import ErrorBody, RequestStatus, SignCertificate
from hapki.cara.ports import Intent, IssuedRecord, IssuerRecord, Outcome
from hapki.runtime import delegated_intents
from hapki.runtime.audit import AuditKind, AuditRecord, append, append_many, append_statements, derived_id
from hapki.runtime.db import Database, Fence, at_fence, before_fence, db_time, execute_many, fence_guard, utc
from hapki.runtime.ids import time_ordered_id

TIER = "cara"


_CERTIFICATE_COLUMNS = "request_id, issuer, serial, intent_id, cert_pem, not_before, not_after"


class _Contended(Exception):
    """Raised inside a transaction body that met another attempt's row: the body rolls back and runs carefully."""


def _mark_requests_issued(records: Sequence[IssuedRecord], now: datetime) -> tuple[str, tuple[object, ...]]:
    """One UPDATE that marks every record's request issued, with its serial, issuer and not_after."""
    if len(records) == 1:
        [r] = records
        return ("UPDATE requests SET status = 'issued', serial = %s, issuer = %s, not_after = %s, updated_at = %s"
                " WHERE id = %s", (r.serial, r.issuer, db_time(r.not_after), db_time(now), r.request_id))
    rows = " UNION ALL ".join(["SELECT %s AS id, %s AS serial, %s AS issuer, %s AS not_after"]
                              + ["SELECT %s, %s, %s, %s"] * (len(records) - 1))
    # The rows first, then each request by its primary key (an empty or small table would otherwise be scanned).
    return (f"UPDATE ({rows}) v STRAIGHT_JOIN requests r FORCE INDEX (PRIMARY) ON r.id = v.id"
            " SET r.status = 'issued', r.serial = v.serial, r.issuer = v.issuer, r.not_after = v.not_after,"
            " r.updated_at = %s",
            (*(value for r in records for value in (r.request_id, r.serial, r.issuer, db_time(r.not_after))),
             db_time(now)))


def _insert_certificates(records: Sequence[IssuedRecord], epoch: int, now: datetime) -> tuple[str, tuple[object, ...]]:
    """The certificates' INSERT, numbered by the fence (@hapki_fence_seq: commit order, 0002): an at_fence statement."""
    return ("INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem, not_before, not_after,"
            " created_at, fence_seq) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, @hapki_fence_seq)"] * len(records)),
            tuple(value for r in records for value in (
                r.issuer, r.serial, r.request_id, r.intent_id, epoch, r.cert_pem, db_time(r.not_before),
                db_time(r.not_after), db_time(now))))


def in_marks(items: Sized) -> str:
    """`%s` placeholders for an IN list of len(items) values."""
    return ", ".join(["%s"] * len(items))


def _same_request(stored_json: str, request: SignCertificate) -> bool:
    """Whether the SignCertificate CLM stored (JSON) is exactly `request`."""
    try:
        return SignCertificate.model_validate_json(stored_json) == request
    except ValueError:  # pydantic's ValidationError: a row no current model reads is not this message
        return False


def _issued(row: tuple) -> IssuedRecord:
    """An IssuedRecord from a row of _CERTIFICATE_COLUMNS."""
    return IssuedRecord(*row[:5], not_before=utc(row[5]), not_after=utc(row[6]))


async def abandoned(cur: aiomysql.Cursor, intents: list[tuple], *, actor: str, epoch: int | None, reason: str,
                    now: datetime) -> None:
    """Audit entries for intents (id, request_id, issuer, serial) just abandoned: each serial stays accounted for.

    Ids derive from the intent: an intent is abandoned once, so a retried body cannot add a second entry.
    """
    for intent_id, request_id, issuer, serial in intents:
        await append(cur, AuditRecord(
            kind=AuditKind.INTENT_ABANDONED, actor=actor, created_at=now, epoch=epoch, request_id=request_id,
            issuer=issuer, serial=serial, detail={"intent_id": intent_id, "reason": reason},
            id=derived_id(AuditKind.INTENT_ABANDONED.value, intent_id)))


class MariaDBSigningStore:
    """SigningStore on MariaDB/Galera. Every state change appends its audit entry in its own transaction."""

    def __init__(self, db: Database, *, actor: str = "cara") -> None:
        self._db = db
        self._actor = actor  # recorded on audit entries: service:member

    @property
    def actor(self) -> str:
        return self._actor

    async def load_issuer(self, name: str | None) -> IssuerRecord:
        async def body(cur: aiomysql.Cursor) -> IssuerRecord:
            if name is None:
                await cur.execute("SELECT name, cert_pem, chain_pem, key_id FROM issuers WHERE is_default = 1")
            else:
                await cur.execute("SELECT name, cert_pem, chain_pem, key_id FROM issuers WHERE name = %s", (name,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"issuer {name or '(default)'} not found; run `hapki ca init`", {"issuer": name})
            return IssuerRecord(name=row[0], cert_pem=row[1], chain_pem=row[2], key_id=bytes.fromhex(row[3]))

        return await self._db.run(body, name="cara.load_issuer")

    async def load_issuers(self) -> tuple[list[IssuerRecord], str | None]:
        """Every issuing CA stored, oldest first, and the default's name (None: no default)."""
        async def body(cur: aiomysql.Cursor) -> tuple[list[IssuerRecord], str | None]:
            await cur.execute("SELECT name, cert_pem, chain_pem, key_id, is_default, revoked_at, revocation_reason"
                              " FROM issuers ORDER BY created_at, name")
            rows = await cur.fetchall()
            records = [IssuerRecord(name=r[0], cert_pem=r[1], chain_pem=r[2], key_id=bytes.fromhex(r[3]),
                                    revoked_at=utc(r[5]), revocation_reason=r[6]) for r in rows]
            return records, next((r[0] for r in rows if r[4]), None)

        return await self._db.run(body, name="cara.load_issuers")

    async def issued_per_issuer(self) -> dict[str, int]:
        """Certificates stored, by issuer (reads the certificates' primary key: about a second per million)."""
        async def body(cur: aiomysql.Cursor) -> dict[str, int]:
            await cur.execute("SELECT issuer, COUNT(*) FROM certificates GROUP BY issuer")
            return {row[0]: int(row[1]) for row in await cur.fetchall()}

        return await self._db.run(body, name="cara.issued_per_issuer")

    async def revoke_issuer(self, name: str, *, reason: str, now: datetime) -> None:
        """Record that the root revoked issuing CA `name` (audited `issuer.revoked`); the ARL lists it from its next
        signing. NotFound: no such CA; AlreadyRevoked: its revocation stands; GuardFailed: it is the default (roll
        over first: something must issue)."""
        async def body(cur: aiomysql.Cursor) -> None:
            await cur.execute("SELECT is_default, revoked_at, cert_pem FROM issuers WHERE name = %s FOR UPDATE", (name,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"issuer {name} not found", {"issuer": name})
            if row[1] is not None:
                raise AlreadyRevoked(f"issuer {name} was revoked at {utc(row[1]).isoformat()}", {"issuer": name})
            if row[0]:
                raise GuardFailed(f"issuer {name} is the default: roll over to another (`hapki ca rollover`) first",
                                  {"issuer": name})
            await cur.execute("UPDATE issuers SET revoked_at = %s, revocation_reason = %s WHERE name = %s",
                              (db_time(now), reason, name))
            serial = format(x509.load_pem_x509_certificate(row[2].encode()).serial_number, "x")
            await append(cur, AuditRecord(kind=AuditKind.ISSUER_REVOKED, actor=self._actor, created_at=now,
                                          issuer=name, serial=serial, detail={"reason": reason}))

        await self._db.run(body, name="cara.revoke_issuer")

    async def make_default(self, name: str, *, now: datetime) -> str | None:
        """Issue from `name` from now on (audited `issuer.default`); the default before, if any (NotFound: no such
        issuer)."""
        async def body(cur: aiomysql.Cursor) -> str | None:
            await cur.execute("SELECT name, is_default, revoked_at FROM issuers FOR UPDATE")
            found = await cur.fetchall()
            rows = {row[0]: row[1] for row in found}
            if name not in rows:
                raise NotFound(f"issuer {name} not found", {"issuer": name})
            if any(row[0] == name and row[2] is not None for row in found):
                raise AlreadyRevoked(f"issuer {name} is revoked: nothing may issue from it", {"issuer": name})
            before = next((n for n, is_default in rows.items() if is_default), None)
            if before == name:
                return before
            await cur.execute("UPDATE issuers SET is_default = (name = %s)", (name,))
            await append(cur, AuditRecord(kind=AuditKind.ISSUER_DEFAULT, actor=self._actor, created_at=now,
                                          issuer=name, detail={"replaces": before}))
            return before

        return await self._db.run(body, name="cara.make_default")

    async def save_issuer(self, record: IssuerRecord, *, default: bool, now: datetime) -> None:
        async def body(cur: aiomysql.Cursor) -> None:
            if default:
                await cur.execute("UPDATE issuers SET is_default = 0 WHERE is_default = 1")
            await cur.execute(
                "INSERT INTO issuers (name, cert_pem, chain_pem, key_id, is_default, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (record.name, record.cert_pem, record.chain_pem, record.key_id.hex(), int(default), db_time(now)),
            )
            await append(cur, entry)

        entry = AuditRecord(
            kind=AuditKind.ISSUER_CREATED, actor=self._actor, created_at=now, issuer=record.name,
            detail={"key_id": record.key_id.hex(), "default": default,
                    "subject": record.certificate.subject.rfc4514_string(),
                    "cert_sha256": hashlib.sha256(record.cert_pem.encode()).hexdigest()})

        await self._db.run(body, name="cara.save_issuer")

    async def bump_epoch(self, member: str, now: datetime) -> int:
        """Compare-and-set the tier's epoch to one more than what we read; return the new epoch."""

        async def body(cur: aiomysql.Cursor) -> int | None:
            await cur.execute("SELECT epoch FROM epochs WHERE tier = %s", (TIER,))
            row = await cur.fetchone()
            if row is None:
                await cur.execute(
                    "INSERT IGNORE INTO epochs (tier, epoch, holder, fence_seq, updated_at) VALUES (%s, 1, %s, 0, %s)",
                    (TIER, member, db_time(now)),
                )
                if cur.rowcount != 1:
                    return None
                await cur.execute(
                    "INSERT INTO epoch_changes (tier, epoch, holder, fence_seq, changed_at) VALUES (%s, 1, %s, 0, %s)",
                    (TIER, member, db_time(now)),
                )
                await append(cur, replace(entry, epoch=1, detail={"tier": TIER, "holder": member, "previous": None}))
                return 1
            await cur.execute(
                "UPDATE epochs SET epoch = epoch + 1, holder = %s, updated_at = %s, fence_seq = fence_seq + 1"
                " WHERE tier = %s AND epoch = %s",
                (member, db_time(now), TIER, row[0]),
            )
            if cur.rowcount != 1:
                return None
            await cur.execute(
                "INSERT INTO epoch_changes (tier, epoch, holder, fence_seq, changed_at)"
                " SELECT tier, epoch, holder, fence_seq, updated_at FROM epochs WHERE tier = %s",
                (TIER,),
            )
            await append(cur, replace(entry, epoch=row[0] + 1,
                                      detail={"tier": TIER, "holder": member, "previous": row[0]}))
            return row[0] + 1

        for _ in range(20):
            entry = AuditRecord(kind=AuditKind.EPOCH_CHANGED, actor=self._actor, created_at=now)
            epoch = await self._db.run(body, name="cara.bump_epoch")
            if epoch is not None:
                return epoch
        raise FencedOut("could not bump the epoch: it keeps moving under us")

    async def abandon_stale_intents(self, epoch: int, now: datetime) -> int:
        """Resolve intents of older epochs that never got a certificate: their signer can no longer commit."""

        async def body(cur: aiomysql.Cursor) -> int:
            await cur.execute(
                "SELECT id, request_id, issuer, serial FROM signing_intents WHERE state = 'reserved' AND epoch < %s"
                " FOR UPDATE", (epoch,))
            stale = list(await cur.fetchall())
            if not stale:
                return 0
            await cur.execute(
                "UPDATE signing_intents SET state = 'abandoned', resolved_at = %s,"
                " resolution = CONCAT('recovered: epoch ', epoch, ' superseded by ', %s)"
                f" WHERE state = 'reserved' AND id IN ({', '.join(['%s'] * len(stale))})",
                (db_time(now), epoch, *(row[0] for row in stale)),
            )
            await abandoned(cur, stale, actor=self._actor, epoch=epoch, now=now,
                            reason=f"recovered: superseded by epoch {epoch}")
            return len(stale)

        return await self._db.run(body, name="cara.recover", fence=Fence(TIER, epoch))

    async def reserved_intents(self) -> tuple[int, datetime | None]:
        """How many signing intents are reserved, and the oldest one's creation time: a range of ix_intents_state
        (reserved intents are the few in flight), read for the metrics every few seconds."""

        async def body(cur: aiomysql.Cursor) -> tuple[int, datetime | None]:
            await cur.execute("SELECT COUNT(*), MIN(created_at) FROM signing_intents WHERE state = 'reserved'")
            count, oldest = await cur.fetchone()
            return int(count), utc(oldest)

        # Named for what it is, a metrics read: not among the signing path's `cara.*` transactions in traces (the
        # tests that count a batch's transactions would count a sample that happened to fall in their window).
        return await self._db.run(body, name="metrics.reserved_intents")

    async def outcome(self, request_id: str) -> Outcome:
        return (await self.outcomes([request_id])).get(request_id, Outcome())

    async def outcomes(self, request_ids: Sequence[str]) -> dict[str, Outcome]:
        """What is final for each request (stored certificate, or failed), in one read of one round trip.

        Requests with nothing final yet are left out of the answer. The read-only transaction's COMMIT goes in the
        same round trip (Database.run sends none after it).
        """
        ids = list(dict.fromkeys(request_ids))

        async def body(cur: aiomysql.Cursor) -> dict[str, Outcome]:
            (_, issued), (_, failed) = await execute_many(cur, [
                (f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE request_id IN ({in_marks(ids)})", ids),
                (f"SELECT id, error_code, error_message FROM requests WHERE id IN ({in_marks(ids)}) AND status = %s",
                 (*ids, RequestStatus.FAILED.value)),
            ], commit=True)
            found = {row[0]: Outcome(issued=_issued(row)) for row in issued}
            for row in failed:
                found.setdefault(row[0], Outcome(failed=ErrorBody(code=row[1], message=row[2] or "")))
            return found

        if not ids:
            return {}
        return await self._db.run(body, name="cara.outcome")

    async def reserve_fresh(self, intents: Sequence[Intent], *, epoch: int, member: str, now: datetime) -> bool:
        """Reserve the serials and write the signing intents of requests that have nothing stored yet, fenced, in
        one round trip: the usual batch. True if reserved; False, with nothing written, if any of the requests has
        a certificate, is failed, or has a reserved intent already (a redelivery): the caller then reads their
        outcomes and reserves the rest with reserve_batch, which supersedes such intents. FencedOut under a stale
        epoch; DuplicateKey on a serial collision (the caller draws again).

        The fence checks the three conditions itself (fence_guard, on a read in the same round trip) instead of an
        outcome read and a supersede before it: one round trip and one transaction instead of three round trips
        in two. Under READ COMMITTED, as reserve_batch, so that the guard's reads lock nothing. A commit whose
        answer was lost runs the body again and meets its own intents: False, and reserve_batch supersedes them
        (never signed, audited).
        """
        if not intents:
            return True
        requests = list(dict.fromkeys(intent.request_id for intent in intents))
        marks = in_marks(requests)

        async def body(cur: aiomysql.Cursor) -> None:
            before_fence("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            # A SELECT, not a condition inside the fence's UPDATE: with wsrep_sync_wait = 1 (the lab's and compose's
            # setting) a read waits until this node has applied what the cluster committed before it, as the
            # outcome read did; an UPDATE does not wait.
            before_fence(f"SELECT NOT EXISTS (SELECT 1 FROM certificates WHERE request_id IN ({marks}))"
                         f" AND NOT EXISTS (SELECT 1 FROM requests WHERE id IN ({marks}) AND status = %s)"
                         f" AND NOT EXISTS (SELECT 1 FROM signing_intents WHERE request_id IN ({marks})"
                         " AND state = 'reserved') INTO @hapki_fresh",
                         (*requests, *requests, RequestStatus.FAILED.value, *requests))
            fence_guard("@hapki_fresh")
            at_fence("INSERT INTO signing_intents (id, request_id, issuer, serial, epoch, member, state, created_at)"
                     f" VALUES {', '.join(['(%s, %s, %s, %s, %s, %s, %s, %s)'] * len(intents))}",
                     tuple(value for intent in intents for value in (
                         intent.intent_id, intent.request_id, intent.issuer, intent.serial, epoch, member,
                         "reserved", db_time(now))))

        try:
            await self._db.run(body, name="cara.reserve_fresh", fence=Fence(TIER, epoch))
        except GuardFailed:
            return False
        return True

    async def reserve(
        self, *, intent_id: str, request_id: str, issuer: str, serial: str, epoch: int, member: str, now: datetime
    ) -> None:
        """Reserve one serial and signing intent, fenced (see reserve_batch)."""
        await self.reserve_batch([Intent(intent_id=intent_id, request_id=request_id, issuer=issuer, serial=serial)],
                                 epoch=epoch, member=member, now=now)

    async def reserve_batch(self, intents: Sequence[Intent], *, epoch: int, member: str, now: datetime) -> None:
        """Reserve the serials and write the signing intents, fenced, in one transaction. Idempotent by intent id.

        Older reserved intents of the same requests are abandoned here (audited): their signature, if one was made,
        never reached the database and never will (redelivery after a crash between sign and commit). A serial
        already taken (UNIQUE (issuer, serial)) fails the whole transaction with DuplicateKey: the caller draws
        again. Two round trips: supersede + insert, fence + COMMIT (a duplicate key: one more read, to tell our own
        earlier commit, whose outcome was unknown, from a collision).
        """
        if not intents:
            return
        ids = [intent.intent_id for intent in intents]
        requests = list(dict.fromkeys(intent.request_id for intent in intents))
        resolution = "superseded by a new attempt for the request"

        async def body(cur: aiomysql.Cursor) -> None:
            # READ COMMITTED, for this transaction only: the supersede UPDATE then locks just the rows it changes.
            # Under REPEATABLE READ, finding none locked the gap where the requests would be in ix_intents_request;
            # request ids are time-ordered, so batches reserving at once all locked the same gap (the index's end)
            # and their inserts into it deadlocked (InnoDB rolled one back: ~3% of reservations at 300/s ran twice).
            # Nothing here needs the stronger level: a request in two batches at once can get two reserved intents
            # either way (an UPDATE never sees the other's uncommitted insert), and at most one of them stores a
            # certificate (UNIQUE request_id; record_issued_batch abandons the other, audited).
            await cur.execute(
                "SET TRANSACTION ISOLATION LEVEL READ COMMITTED;"
                " UPDATE signing_intents SET state = 'abandoned', resolved_at = %s, resolution = %s"
                f" WHERE request_id IN ({in_marks(requests)}) AND state = 'reserved';"
                " INSERT INTO signing_intents (id, request_id, issuer, serial, epoch, member, state, created_at)"
                f" VALUES {', '.join(['(%s, %s, %s, %s, %s, %s, %s, %s)'] * len(intents))}",
                (db_time(now), resolution, *requests,
                 *(value for intent in intents for value in (intent.intent_id, intent.request_id, intent.issuer,
                                                             intent.serial, epoch, member, "reserved", db_time(now)))),
            )
            await cur.nextset()  # the UPDATE's result
            superseded = cur.rowcount
            await cur.nextset()  # the insert's result: a duplicate key surfaces here
            if superseded:  # rare (a redelivery after a crash): find which, for the audit log
                await cur.execute(
                    "SELECT id, request_id, issuer, serial FROM signing_intents"
                    f" WHERE request_id IN ({in_marks(requests)})"
                    " AND state = 'abandoned' AND resolved_at = %s AND resolution = %s",
                    (*requests, db_time(now), resolution))
                await abandoned(cur, list(await cur.fetchall()), actor=self._actor, epoch=epoch, now=now,
                                reason=resolution)

        async def ours(cur: aiomysql.Cursor) -> int:
            await cur.execute(f"SELECT COUNT(*) FROM signing_intents WHERE id IN ({in_marks(ids)})", ids)
            return int((await cur.fetchone())[0])

        try:
            await self._db.run(body, name="cara.reserve", fence=Fence(TIER, epoch))
        except DuplicateKey:
            if await self._db.run(ours, name="cara.reserve_check") != len(ids):
                raise  # a serial collision: nothing of ours was written
            # Our earlier attempt committed (all or nothing); the outcome of its COMMIT was unknown to us.

    async def record_issued(self, record: IssuedRecord, *, epoch: int, now: datetime) -> IssuedRecord:
        """Store one certificate, fenced (see record_issued_batch); FencedOut if its intent is no longer reserved."""
        [stored] = await self.record_issued_batch([record], epoch=epoch, now=now)
        if stored is None:
            raise FencedOut(f"intent {record.intent_id} is no longer reserved", {"intent_id": record.intent_id})
        return stored

    async def record_issued_batch(
        self, records: Sequence[IssuedRecord], *, epoch: int, now: datetime
    ) -> list[IssuedRecord | None]:
        """Store the certificates, resolve their intents and mark their requests issued: one fenced transaction.

        Per record, in order, what is stored for its request: ours; or, when another intent already produced the
        request's certificate, theirs (ours is abandoned: at most one certificate per request id, UNIQUE
        request_id); or None when our intent is no longer reserved (a newer attempt for the request superseded
        it; its signature is never stored). The usual case is one round trip: the intents' update, the fence
        (guarded by that update's row count: every intent was still reserved), the requests' update, the audit
        entries, the certificates (numbered by the fence: commit order) and COMMIT. When the unique keys or the
        intents' states say another attempt got in the way (or our own earlier COMMIT, whose outcome was unknown,
        did happen), the transaction is rolled back and run again the careful way: read what exists first, settle
        each record.
        """
        if not records:
            return []
        entries = {record.intent_id: AuditRecord(
            kind=AuditKind.CERTIFICATE_ISSUED, actor=self._actor, created_at=now, epoch=epoch,
            request_id=record.request_id, issuer=record.issuer, serial=record.serial,
            detail={"intent_id": record.intent_id, "not_before": record.not_before.isoformat(),
                    "not_after": record.not_after.isoformat(),
                    "cert_sha256": hashlib.sha256(record.cert_pem.encode()).hexdigest()}) for record in records}
        lost_reason = "request already issued by another intent"

        async def store(cur: aiomysql.Cursor, fresh: Sequence[IssuedRecord]) -> None:
            """Resolve the intents, mark the requests, append the audit entries: one round trip. The certificates
            are inserted in the next, right after the fence and with its sequence number (their commit order, 0002),
            then COMMIT. _Contended if an intent is not reserved any more: the statements after that update ran too,
            but nothing of this transaction may then commit."""
            counts = await append_many(cur, [entries[r.intent_id] for r in fresh], first=[
                ("UPDATE signing_intents SET state = 'issued', resolved_at = %s, resolution = 'certificate stored'"
                 f" WHERE id IN ({in_marks(fresh)}) AND state = 'reserved'",
                 (db_time(now), *(r.intent_id for r in fresh))),
                # The requests' new states; issuer and not_after too: CLM's inventory searches and expiry scans
                # read them here (0004).
                _mark_requests_issued(fresh, now),
            ])
            if counts[0] != len(fresh):
                raise _Contended("an intent of this batch is no longer reserved")
            # A duplicate request_id or serial (another attempt's certificate) raises DuplicateKey at the commit.
            at_fence(*_insert_certificates(fresh, epoch, now))

        async def straight(cur: aiomysql.Cursor) -> list[IssuedRecord | None]:
            """The usual batch, in one round trip: every intent still reserved (the guard checks the UPDATE's row
            count, GuardFailed otherwise), nothing stored for its request yet (a duplicate key otherwise)."""
            before_fence("UPDATE signing_intents SET state = 'issued', resolved_at = %s,"
                         f" resolution = 'certificate stored' WHERE id IN ({in_marks(records)}) AND state = 'reserved'",
                         (db_time(now), *(r.intent_id for r in records)))
            before_fence("SET @hapki_issued = ROW_COUNT()")
            fence_guard("@hapki_issued = %s", (len(records),))
            for sql, args in [_mark_requests_issued(records, now),
                              *append_statements([entries[r.intent_id] for r in records])]:
                at_fence(sql, args)
            at_fence(*_insert_certificates(records, epoch, now))
            return list(records)

        async def careful(cur: aiomysql.Cursor) -> list[IssuedRecord | None]:
            await cur.execute(
                f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE request_id IN"
                f" ({in_marks(records)}); SELECT id FROM signing_intents WHERE id IN ({in_marks(records)})"
                " AND state = 'reserved' FOR UPDATE",
                (*(r.request_id for r in records), *(r.intent_id for r in records)),
            )
            existing = {row[0]: _issued(row) for row in await cur.fetchall()}
            await cur.nextset()
            reserved = {row[0] for row in await cur.fetchall()}
            result: dict[str, IssuedRecord | None] = {}
            fresh: list[IssuedRecord] = []
            for record in records:
                stored = existing.get(record.request_id)
                if stored is not None:
                    result[record.intent_id] = stored
                    if stored.intent_id != record.intent_id and record.intent_id in reserved:
                        await cur.execute(
                            "UPDATE signing_intents SET state = 'abandoned', resolved_at = %s, resolution = %s"
                            " WHERE id = %s AND state = 'reserved'", (db_time(now), lost_reason, record.intent_id))
                        await abandoned(cur, [(record.intent_id, record.request_id, record.issuer, record.serial)],
                                        actor=self._actor, epoch=epoch, now=now, reason=lost_reason)
                elif record.intent_id not in reserved:
                    result[record.intent_id] = None  # superseded (or recovered by a newer epoch: the fence fails)
                else:
                    result[record.intent_id] = record
                    existing[record.request_id] = record  # a second copy of the request in this batch loses
                    fresh.append(record)
            if fresh:
                await store(cur, fresh)
            return [result[record.intent_id] for record in records]

        for body in (straight, careful, careful, careful):
            try:
                return await self._db.run(body, name="cara.record_issued", fence=Fence(TIER, epoch))
            except (_Contended, GuardFailed, DuplicateKey):
                # Another attempt's row (a concurrent commit of one of these requests, by another process or
                # member, won a UNIQUE key; or a newer attempt superseded an intent): settle record by record.
                continue
        raise DuplicateKey("certificates of this batch keep colliding with concurrent commits")

    async def refuse(self, request: SignCertificate, error: ErrorBody, *, epoch: int, now: datetime) -> bool:
        """Record the CA's refusal of a signing request; True if the request is (now) failed with this error.

        The message is unauthenticated input when its approval is bad, so it changes the request's state only if it
        is exactly what CLM recorded for that request id (stored SignCertificate equal, approval fields included):
        then the request is marked failed (entry `request.failed`), as for a request queued before approvals
        existed. Anything else (a forged message, one naming another request's id) changes no state: it gets a
        `signing.refused` entry, once per distinct message and error code, so a replay loop cannot fill the log.
        """

        async def body(cur: aiomysql.Cursor) -> bool:
            await cur.execute("SELECT status, error_code, sign_request FROM requests WHERE id = %s FOR UPDATE",
                              (request.request_id,))
            row = await cur.fetchone()
            recorded = row is not None and _same_request(row[2], request)
            if recorded and row[0] == RequestStatus.PENDING.value:
                await append(cur, failed, first=(
                    "UPDATE requests SET status = 'failed', error_code = %s, error_message = %s, updated_at = %s"
                    " WHERE id = %s AND status = 'pending'",
                    (error.code.value, error.message[:512], db_time(now), request.request_id),
                ))
                return True
            if recorded and row[0] == RequestStatus.FAILED.value and row[1] == error.code.value:
                return True  # a redelivery of a refusal already recorded
            stored = "absent" if row is None else "differs" if not recorded else row[0]
            # A derived id: a second refusal of the same message and code is a duplicate key (below), not an entry.
            await append(cur, replace(refused, detail={**refused.detail, "stored_request": stored}))
            return False

        content_sha256 = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        failed = AuditRecord(kind=AuditKind.REQUEST_FAILED, actor=self._actor, created_at=now, epoch=epoch,
                             request_id=request.request_id,
                             detail={"code": error.code.value, "message": error.message[:512]})
        refused = AuditRecord(
            kind=AuditKind.SIGNING_REFUSED, actor=self._actor, created_at=now, epoch=epoch,
            request_id=request.request_id,
            detail={"code": error.code.value, "message": error.message[:512], "content_sha256": content_sha256,
                    "approval_key_id": request.approval_key_id, "profile": request.profile[:64],
                    "names": [*request.dns_names, *request.ip_addresses, *request.emails][:10]},
            id=derived_id(AuditKind.SIGNING_REFUSED.value, request.request_id, error.code.value, content_sha256))
        try:
            return await self._db.run(body, name="cara.refuse", fence=Fence(TIER, epoch))
        except DuplicateKey:
            return False  # this refusal is audited already (the audit table is insert-only for services)

    async def reserve_delegated(self, *, issuer: str, serial: str, purpose: str, now: datetime) -> str:
        """Reserve the serial of a delegated signer's certificate a ceremony is about to sign (`hapki ca init`,
        `rollover`, `ocsp-rekey`): a signing intent of `purpose` under epoch 0, member `ceremony`, unfenced (a
        ceremony has no epoch; see hapki.runtime.delegated_intents). Returns its id; DuplicateKey: the serial is
        taken."""
        intent_id = time_ordered_id()

        async def body(cur: aiomysql.Cursor) -> None:
            await cur.execute(delegated_intents.RESERVE_SQL, delegated_intents.reserve_args(
                intent_id, issuer=issuer, serial=serial, purpose=purpose, epoch=0, member=delegated_intents.CEREMONY,
                now=now))

        await self._db.run(body, name="cli.reserve_delegated")
        return intent_id

    async def abandon_intent(self, intent_id: str, reason: str, now: datetime) -> None:
        """Resolve a reserved intent whose signature will never be stored. Unfenced: abandoning is always safe."""

        async def body(cur: aiomysql.Cursor) -> None:
            await cur.execute(
                "UPDATE signing_intents SET state = 'abandoned', resolved_at = %s, resolution = %s"
                " WHERE id = %s AND state = 'reserved'",
                (db_time(now), reason[:255], intent_id),
            )
            if cur.rowcount:
                await cur.execute("SELECT id, request_id, issuer, serial, epoch FROM signing_intents WHERE id = %s",
                                  (intent_id,))
                row = await cur.fetchone()
                await abandoned(cur, [row[:4]], actor=self._actor, epoch=row[4], reason=reason[:255], now=now)

        await self._db.run(body, name="cara.abandon_intent")
