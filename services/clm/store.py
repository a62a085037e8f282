"""MariaDB adapter of CLM's RequestStore: recording requests idempotently and reading results."""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import aiomysql
from opentelemetry import trace

from hapki.clm.inventory import CERTIFICATE_BY_SERIAL, names_of
from hapki.clm.ports import NewRequest, Recorded, Rejection
from hapki.contracts.errors import AlreadyRevoked, DuplicateKey, IdempotencyConflict, Internal, NotFound
from hapki.contracts.models import (
    CertificateReply,
    ErrorBody,
    IssueReply,
    RequestStatus,
    RevocationReason,
    RevokeReply,
    SignCertificate,
)
from hapki.runtime.audit import AuditKind, AuditRecord, append, append_many, derived_id
from hapki.runtime.db import Database, db_time, utc


# What `record` reads of an existing request: enough to answer a repeat or refuse a conflicting one.
_RECORDED_COLUMNS = "id, profile, csr_sha256, sign_request, renews_serial"


# Recording batches (see MariaDBRequestStore.record): at most this many requests per transaction, and by default at
# most this many recording transactions in flight per CLM process (ClmConfig.record_transactions_in_flight).
RECORD_BATCH_MAX = 64
RECORDS_IN_FLIGHT = 1


@dataclass
class _Pending:
    """A request waiting to be recorded, with its caller's context (the batch's spans go to the first one's trace)."""

    request: NewRequest
    now: datetime
    done: asyncio.Future[Recorded]
    context: contextvars.Context
    span: trace.Span


class MariaDBRequestStore:
    """RequestStore on MariaDB/Galera. A recorded or rejected request appends its audit entry."""

    def __init__(self, db: Database, *, actor: str = "clm", batch_max: int = RECORD_BATCH_MAX,
                 in_flight: int = RECORDS_IN_FLIGHT) -> None:
        if batch_max < 1 or in_flight < 1:
            raise ValueError("batch_max and in_flight must be at least 1")
        self._db = db
        self._actor = actor  # recorded on audit entries: service:member
        self._batch_max, self._in_flight = batch_max, in_flight
        self._waiting: deque[_Pending] = deque()
        self._recorders = 0  # recording loops running (at most in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches: list[int] = []  # sizes of the last batches recorded (for tests), newest last

    async def record(self, request: NewRequest, now: datetime) -> Recorded:
        """Insert the request, or return the one an idempotency key already names (same CSR and profile only).

        Requests that arrive while `in_flight` recording transactions are under way are recorded together, in one
        transaction and one round trip, by the next one to finish: nothing waits for a batch to fill (at low load
        every request has a transaction of its own, as before). A batch that hits a unique key (a repeat of an
        idempotency key, our own earlier attempt) or any other error of one of its rows is recorded again request
        by request, so each caller gets its own answer; a database that is down fails the whole batch at once.
        A caller that stops waiting does not take its request out of a batch already under way: the request may be
        recorded and not queued, which the outbox sweep (republish_stale) catches up with.
        """
        done: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(request, now, done, contextvars.copy_context(), trace.get_current_span()))
        if self._recorders < self._in_flight:
            self._recorders += 1
            task = asyncio.ensure_future(self._recording_loop())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await done

    async def _recording_loop(self) -> None:
        try:
            while self._waiting:
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._batch_max))]
                self.batches = [*self.batches[-99:], len(batch)]
                # In the first caller's context: its trace gets the database span of the batch.
                await asyncio.get_running_loop().create_task(self._record_batch(batch), context=batch[0].context)
        finally:
            self._recorders -= 1

    async def _record_batch(self, batch: list[_Pending]) -> None:
        """Record `batch` and settle every caller's future, whatever happens (nobody is left waiting)."""
        try:
            if len(batch) == 1:
                _settle(batch[0].done, result=await self._record_one(batch[0].request, batch[0].now))
                return
            try:
                await self._db.run(self._insert_body([(p.request, p.now) for p in batch]), name="clm.record_batch")
            except (DuplicateKey, Internal):
                # A row of the batch could not go in as it is: each request again on its own, for its own answer.
                outcomes = await asyncio.gather(*(self._record_one(p.request, p.now) for p in batch),
                                                return_exceptions=True)
                for pending, outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        _settle(pending.done, error=outcome)
                    else:
                        _settle(pending.done, result=outcome)
                return
            size = len(batch)
            for pending in batch:
                pending.span.add_event("clm.recorded_in_batch", {"batch.size": size})
                _settle(pending.done, result=Recorded(request_id=pending.request.request_id, created=True,
                                                      approved=pending.request.approved))
        except BaseException as exc:
            for pending in batch:
                _settle(pending.done, error=exc)
            if not isinstance(exc, Exception):
                raise  # cancelled (shutdown): the callers were told, the task still ends as cancelled

    def _insert_body(self, requests: Sequence[tuple[NewRequest, datetime]]) -> Callable[[aiomysql.Cursor], Awaitable[None]]:
        """The transaction that records `requests` (one or many) in one round trip: rows, names, audit, COMMIT.

        The unique keys decide repeats: a duplicate key stops the statements before the COMMIT.
        """
        statements: list[tuple[str, tuple[object, ...]]] = [(
            "INSERT INTO requests (id, requester, idempotency_key, profile, csr_sha256, sign_request, status,"
            " renews_serial, created_at, updated_at) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s)"] * len(requests)),
            tuple(value for request, now in requests for value in (
                request.request_id, request.requester, request.idempotency_key, request.profile, request.csr_sha256,
                request.approved.model_dump_json(), request.renews_serial, db_time(now), db_time(now))),
        )]
        # The names, indexed for search (the value column compares case-insensitively: an email differing only in
        # case is one row).
        names = [(request.request_id, kind, name) for request, _ in requests for kind, name in names_of(request.approved)]
        if names:
            statements.append((
                f"INSERT INTO request_names (request_id, kind, value) VALUES {', '.join(['(%s, %s, %s)'] * len(names))}"
                " ON DUPLICATE KEY UPDATE value = value",
                tuple(value for row in names for value in row),
            ))
        entries = [self._recorded_entry(request, now) for request, now in requests]

        async def insert(cur: aiomysql.Cursor) -> None:
            await append_many(cur, entries, first=statements, commit=True)

        return insert

    def _recorded_entry(self, request: NewRequest, now: datetime) -> AuditRecord:
        return AuditRecord(
            kind=AuditKind.REQUEST_RECORDED, actor=self._actor, created_at=now, request_id=request.request_id,
            detail={"requester": request.requester, "idempotency_key": request.idempotency_key,
                    "profile": request.profile, "csr_sha256": request.csr_sha256,
                    "names": [*request.approved.dns_names, *request.approved.ip_addresses, *request.approved.emails]})

    async def _record_one(self, request: NewRequest, now: datetime) -> Recorded:
        """Record one request; on a duplicate key, find what the key (or our own earlier attempt) already stored."""

        async def existing(cur: aiomysql.Cursor) -> Recorded | None:
            if request.idempotency_key is None:
                await cur.execute(f"SELECT {_RECORDED_COLUMNS} FROM requests WHERE id = %s", (request.request_id,))
            else:
                await cur.execute(
                    f"SELECT {_RECORDED_COLUMNS} FROM requests WHERE id = %s UNION ALL"
                    f" SELECT {_RECORDED_COLUMNS} FROM requests WHERE requester = %s AND idempotency_key = %s",
                    (request.request_id, request.requester, request.idempotency_key))
            rows = await cur.fetchall()
            if any(row[0] == request.request_id for row in rows):
                return Recorded(request_id=request.request_id, created=True, approved=request.approved)
            if not rows:
                return None
            row = rows[0]
            if (row[1], row[2], row[4]) != (request.profile, request.csr_sha256, request.renews_serial):
                raise IdempotencyConflict(
                    "idempotency key already used for a different CSR, profile or renewed certificate",
                    {"idempotency_key": request.idempotency_key, "request_id": row[0]},
                )
            return Recorded(request_id=row[0], created=False, approved=SignCertificate.model_validate_json(row[3]))

        try:
            await self._db.run(self._insert_body([(request, now)]), name="clm.record")
            return Recorded(request_id=request.request_id, created=True, approved=request.approved)
        except DuplicateKey:
            # The key names a request already (a repeat, or a concurrent request with the same key that committed
            # first), or the row is our own from an attempt whose COMMIT outcome was unknown: answer with that.
            found = await self._db.run(existing, name="clm.record_lookup")
            if found is None:
                raise
            return found

    async def record_rejection(self, rejection: Rejection, now: datetime) -> None:
        """Audit a policy refusal. Once per (requester, profile, CSR, code): a replayed bad request adds nothing."""

        async def body(cur: aiomysql.Cursor) -> None:
            await append(cur, entry)

        entry = AuditRecord(
            kind=AuditKind.REQUEST_REJECTED, actor=self._actor, created_at=now,
            detail={"requester": rejection.requester, "profile": rejection.profile,
                    "csr_sha256": rejection.csr_sha256, "code": rejection.code, "message": rejection.message[:512]},
            id=derived_id(AuditKind.REQUEST_REJECTED.value, rejection.requester, rejection.profile,
                          rejection.csr_sha256, rejection.code))
        try:
            await self._db.run(body, name="clm.record_rejection")
        except DuplicateKey:
            pass  # recorded before (derived id): the first entry is kept

    async def view(self, request_id: str) -> IssueReply:
        async def body(cur: aiomysql.Cursor) -> IssueReply:
            await cur.execute(
                "SELECT r.status, r.error_code, r.error_message, c.serial, c.cert_pem, c.not_before, c.not_after,"
                " i.chain_pem FROM requests r LEFT JOIN certificates c ON c.request_id = r.id"
                " LEFT JOIN issuers i ON i.name = c.issuer WHERE r.id = %s",
                (request_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no request {request_id}", {"request_id": request_id})
            status = RequestStatus(row[0])
            error = ErrorBody(code=row[1], message=row[2] or "") if status is RequestStatus.FAILED else None
            return IssueReply(
                request_id=request_id, status=status, serial=row[3], certificate_pem=row[4],
                not_before=utc(row[5]), not_after=utc(row[6]), chain_pem=row[7], error=error,
            )

        return await self._db.run(body, name="clm.view")

    async def certificate(self, serial: str) -> CertificateReply:
        async def body(cur: aiomysql.Cursor) -> CertificateReply:
            await cur.execute(
                "SELECT c.serial, c.request_id, c.issuer, c.cert_pem, i.chain_pem, c.not_before, c.not_after"
                f" FROM {CERTIFICATE_BY_SERIAL}",
                (serial,),
            )
            rows = await cur.fetchall()
            if not rows:
                raise NotFound(f"no certificate with serial {serial}", {"serial": serial})
            row = rows[0]  # serials are random 151-bit values: one issuer per serial in practice
            return CertificateReply(
                serial=row[0], request_id=row[1], issuer=row[2], certificate_pem=row[3], chain_pem=row[4],
                not_before=utc(row[5]), not_after=utc(row[6]),
            )

        return await self._db.run(body, name="clm.certificate")

    async def renewal_by_key(self, requester: str, idempotency_key: str) -> tuple[str, str | None] | None:
        """(request id, renews_serial) of the request an idempotency key names, if any."""

        async def body(cur: aiomysql.Cursor) -> tuple[str, str | None] | None:
            await cur.execute("SELECT id, renews_serial FROM requests WHERE requester = %s AND idempotency_key = %s",
                              (requester, idempotency_key))
            row = await cur.fetchone()
            return (row[0], row[1]) if row is not None else None

        return await self._db.run(body, name="clm.renewal_by_key")

    async def stale_pending(self, older_than: datetime, limit: int) -> list[SignCertificate]:
        async def body(cur: aiomysql.Cursor) -> list[SignCertificate]:
            await cur.execute(
                "SELECT sign_request FROM requests WHERE status = 'pending' AND created_at < %s"
                " ORDER BY created_at LIMIT %s",
                (db_time(older_than), limit),
            )
            return [SignCertificate.model_validate_json(r[0]) for r in await cur.fetchall()]

        return await self._db.run(body, name="clm.stale_pending")


class MariaDBRevocationStore:
    """RevocationStore on MariaDB/Galera: one final row per revoked certificate (PRIMARY KEY issuer, serial)."""

    def __init__(self, db: Database, *, actor: str = "clm") -> None:
        self._db = db
        self._actor = actor  # recorded on audit entries: service:member

    async def revoke(self, serial: str, reason: str, requester: str, now: datetime) -> RevokeReply:
        """Record the revocation; a repeat with the same reason returns the stored one, another reason refuses."""

        async def existing(cur: aiomysql.Cursor, issuer: str) -> RevokeReply | None:
            await cur.execute(
                "SELECT reason, revoked_at, requester FROM revocations WHERE issuer = %s AND serial = %s",
                (issuer, serial),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            if row[0] != reason:
                raise AlreadyRevoked(
                    f"certificate {serial} is already revoked with reason {row[0]}",
                    {"serial": serial, "reason": row[0], "revoked_at": utc(row[1]).isoformat()},
                )
            return RevokeReply(serial=serial, issuer=issuer, reason=RevocationReason(row[0]),
                               revoked_at=utc(row[1]), requester=row[2])

        async def body(cur: aiomysql.Cursor) -> RevokeReply:
            await cur.execute(f"SELECT c.issuer, c.request_id FROM {CERTIFICATE_BY_SERIAL}", (serial,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}", {"serial": serial})
            issuer, request_id = row
            found = await existing(cur, issuer)
            if found is not None:
                return found  # also our own earlier attempt whose COMMIT outcome was unknown
            await append(cur, AuditRecord(
                kind=AuditKind.CERTIFICATE_REVOKED, actor=self._actor, created_at=now, request_id=request_id,
                issuer=issuer, serial=serial, detail={"reason": reason, "requester": requester},
                id=derived_id(AuditKind.CERTIFICATE_REVOKED.value, issuer, serial)), first=(
                "INSERT INTO revocations (issuer, serial, reason, revoked_at, requester, request_id)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (issuer, serial, reason, db_time(now), requester, request_id),
            ))
            # The inventory's copy, in the same transaction (search and expiry scans filter on it).
            await cur.execute("UPDATE requests SET revoked = 1 WHERE id = %s", (request_id,))
            return RevokeReply(serial=serial, issuer=issuer, reason=RevocationReason(reason),
                               revoked_at=utc(db_time(now)), requester=requester)

        try:
            return await self._db.run(body, name="clm.revoke")
        except DuplicateKey:
            # A concurrent revocation of the same certificate committed first: same reason -> its result.
            return await self._db.run(body, name="clm.revoke_lookup")


def _settle(done: asyncio.Future[Recorded], *, result: Recorded | None = None,
            error: BaseException | None = None) -> None:
    """Answer a waiting caller, unless it stopped waiting (its future was cancelled)."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
