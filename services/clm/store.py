"""MariaDB adapter of CLM's RequestStore: recording requests idempotently and reading results."""

from __future__ import annotations

from datetime import datetime

import aiomysql

from hapki.clm.inventory import names_of
from hapki.clm.ports import NewRequest, Recorded, Rejection
from hapki.contracts.errors import AlreadyRevoked, DuplicateKey, IdempotencyConflict, NotFound
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


class MariaDBRequestStore:
    """RequestStore on MariaDB/Galera. A recorded or rejected request appends its audit entry."""

    def __init__(self, db: Database, *, actor: str = "clm") -> None:
        self._db = db
        self._actor = actor  # recorded on audit entries: service:member

    async def record(self, request: NewRequest, now: datetime) -> Recorded:
        """Insert the request, or return the one an idempotency key already names (same CSR and profile only).

        The hot path is one round trip: request, names, audit entry and COMMIT. The unique keys decide the rest (a
        duplicate key stops the statements before the COMMIT): a duplicate is our own earlier attempt (its COMMIT
        outcome was unknown: same request id) or a request the key already names, read in a second transaction
        only then.
        """

        async def insert(cur: aiomysql.Cursor) -> Recorded:
            statements: list[tuple[str, tuple[object, ...]]] = [(
                "INSERT INTO requests (id, requester, idempotency_key, profile, csr_sha256, sign_request, status,"
                " renews_serial, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s)",
                (request.request_id, request.requester, request.idempotency_key, request.profile,
                 request.csr_sha256, request.approved.model_dump_json(), request.renews_serial, db_time(now),
                 db_time(now)),
            )]
            # The names, indexed for search (the value column compares case-insensitively: an email differing
            # only in case is one row).
            if names := names_of(request.approved):
                statements.append((
                    f"INSERT INTO request_names (request_id, kind, value) VALUES {', '.join(['(%s, %s, %s)'] * len(names))}"
                    " ON DUPLICATE KEY UPDATE value = value",
                    tuple(value for kind, name in names for value in (request.request_id, kind, name)),
                ))
            await append_many(cur, [entry], first=statements, commit=True)
            return Recorded(request_id=request.request_id, created=True, approved=request.approved)

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

        entry = AuditRecord(
            kind=AuditKind.REQUEST_RECORDED, actor=self._actor, created_at=now, request_id=request.request_id,
            detail={"requester": request.requester, "idempotency_key": request.idempotency_key,
                    "profile": request.profile, "csr_sha256": request.csr_sha256,
                    "names": [*request.approved.dns_names, *request.approved.ip_addresses, *request.approved.emails]})

        try:
            return await self._db.run(insert, name="clm.record")
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
                " FROM certificates c LEFT JOIN issuers i ON i.name = c.issuer WHERE c.serial = %s",
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
            await cur.execute("SELECT issuer, request_id FROM certificates WHERE serial = %s", (serial,))
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
