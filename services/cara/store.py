"""MariaDB adapter of the CA's SigningStore: serial reservation, fenced commits, epochs, recovery."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime

import aiomysql

from hapki.contracts.errors import DuplicateKey, FencedOut, NotFound
from hapki.contracts.models import ErrorBody, RequestStatus, SignCertificate
from hapki.cara.ports import IssuedRecord, IssuerRecord, Outcome
from hapki.runtime.audit import AuditKind, AuditRecord, append, derived_id
from hapki.runtime.db import Database, Fence, db_time, utc

TIER = "cara"


_CERTIFICATE_COLUMNS = "request_id, issuer, serial, intent_id, cert_pem, not_before, not_after"


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

    async def outcome(self, request_id: str) -> Outcome:
        async def body(cur: aiomysql.Cursor) -> Outcome:
            await cur.execute(
                f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE request_id = %s",
                (request_id,),
            )
            row = await cur.fetchone()
            if row is not None:
                return Outcome(issued=_issued(row))
            await cur.execute("SELECT status, error_code, error_message FROM requests WHERE id = %s", (request_id,))
            req = await cur.fetchone()
            if req is not None and req[0] == RequestStatus.FAILED.value:
                return Outcome(failed=ErrorBody(code=req[1], message=req[2] or ""))
            return Outcome()

        return await self._db.run(body, name="cara.outcome")

    async def reserve(
        self, *, intent_id: str, request_id: str, issuer: str, serial: str, epoch: int, member: str, now: datetime
    ) -> None:
        """Reserve the serial and write the signing intent, fenced, in one transaction. Idempotent by intent id.

        Older reserved intents of the same request are abandoned here: their signature, if one was made, never
        reached the database and never will (redelivery after a crash between sign and commit).
        """

        async def body(cur: aiomysql.Cursor) -> None:
            await cur.execute("SELECT 1 FROM signing_intents WHERE id = %s", (intent_id,))
            if await cur.fetchone() is not None:
                return  # our earlier attempt committed; the outcome of its COMMIT was just unknown to us
            await cur.execute(
                "UPDATE signing_intents SET state = 'abandoned', resolved_at = %s,"
                " resolution = 'superseded by a new attempt for the request'"
                " WHERE request_id = %s AND state = 'reserved'",
                (db_time(now), request_id),
            )
            if cur.rowcount:  # rare (a redelivery after a crash): find which, for the audit log
                await cur.execute(
                    "SELECT id, request_id, issuer, serial FROM signing_intents WHERE request_id = %s"
                    " AND state = 'abandoned' AND resolved_at = %s AND resolution LIKE 'superseded by a new%%'",
                    (request_id, db_time(now)))
                await abandoned(cur, list(await cur.fetchall()), actor=self._actor, epoch=epoch, now=now,
                                reason="superseded by a new attempt for the request")
            await cur.execute(
                "INSERT INTO signing_intents (id, request_id, issuer, serial, epoch, member, state, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, 'reserved', %s)",
                (intent_id, request_id, issuer, serial, epoch, member, db_time(now)),
            )

        await self._db.run(body, name="cara.reserve", fence=Fence(TIER, epoch))

    async def record_issued(self, record: IssuedRecord, *, epoch: int, now: datetime) -> IssuedRecord:
        """Store the certificate, resolve the intent and mark the request issued, fenced. Returns what is stored.

        If another intent already produced the request's certificate, ours is abandoned and theirs returned:
        at most one certificate per request id (UNIQUE request_id).
        """

        async def body(cur: aiomysql.Cursor) -> IssuedRecord:
            await cur.execute(
                f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE request_id = %s",
                (record.request_id,),
            )
            row = await cur.fetchone()
            if row is not None:
                existing = _issued(row)
                if existing.intent_id != record.intent_id:
                    await cur.execute(
                        "UPDATE signing_intents SET state = 'abandoned', resolved_at = %s,"
                        " resolution = 'request already issued by another intent' WHERE id = %s AND state = 'reserved'",
                        (db_time(now), record.intent_id),
                    )
                    if cur.rowcount:
                        await abandoned(cur, [(record.intent_id, record.request_id, record.issuer, record.serial)],
                                        actor=self._actor, epoch=epoch, now=now,
                                        reason="request already issued by another intent")
                return existing
            await cur.execute(
                "INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem,"
                " not_before, not_after, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (record.issuer, record.serial, record.request_id, record.intent_id, epoch, record.cert_pem,
                 db_time(record.not_before), db_time(record.not_after), db_time(now)),
            )
            await cur.execute(
                "UPDATE signing_intents SET state = 'issued', resolved_at = %s, resolution = 'certificate stored'"
                " WHERE id = %s AND state = 'reserved'",
                (db_time(now), record.intent_id),
            )
            if cur.rowcount != 1:
                # The intent was abandoned meanwhile (recovery by a newer epoch): the fence below fails too,
                # but say what happened precisely.
                raise FencedOut(f"intent {record.intent_id} is no longer reserved", {"intent_id": record.intent_id})
            # The request's new state and the audit entry in one round trip (the hot path); issuer and not_after
            # too: CLM's inventory searches and expiry scans read them here (0004).
            await append(cur, entry, first=(
                "UPDATE requests SET status = 'issued', serial = %s, issuer = %s, not_after = %s, updated_at = %s"
                " WHERE id = %s",
                (record.serial, record.issuer, db_time(record.not_after), db_time(now), record.request_id),
            ))
            return record

        entry = AuditRecord(
            kind=AuditKind.CERTIFICATE_ISSUED, actor=self._actor, created_at=now, epoch=epoch,
            request_id=record.request_id, issuer=record.issuer, serial=record.serial,
            detail={"intent_id": record.intent_id, "not_before": record.not_before.isoformat(),
                    "not_after": record.not_after.isoformat(),
                    "cert_sha256": hashlib.sha256(record.cert_pem.encode()).hexdigest()})
        try:
            stamp = (
                "UPDATE certificates SET fence_seq = @hapki_fence_seq WHERE intent_id = %s AND fence_seq IS NULL",
                (record.intent_id,),
            )
            return await self._db.run(body, name="cara.record_issued", fence=Fence(TIER, epoch, stamp))
        except DuplicateKey:
            # A concurrent commit of the same request won the UNIQUE key; report what is stored.
            outcome = await self.outcome(record.request_id)
            if outcome.issued is None:
                raise
            await self.abandon_intent(record.intent_id, "request already issued by another intent", now)
            return outcome.issued

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
