"""MariaDB adapter of CARA's revocation ports: CRL publication (fenced), CRL and OCSP status reads, OCSP signers."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime

import aiomysql
from cryptography import x509

from hapki.cara.ports import CrlEntry, CrlRecord, CrlSchedule, OcspSignerRecord, SerialStatus
from hapki.cara.store import TIER
from hapki.contracts.errors import NotFound
from hapki.runtime import delegated_intents
from hapki.runtime.audit import AuditKind, AuditRecord, append
from hapki.runtime.db import Database, Fence, db_time, utc
from hapki.runtime.ids import time_ordered_id

ROOT_CRL_ISSUER = "root"  # the issuer name of the root's CRLs (ARLs) in `crls`; no issuing CA may take it

# What a CRL build gets: (CRL number, base CRL number for a delta else None, entries) -> signed DER.
BuildCrl = Callable[[int, int | None, list[CrlEntry]], Awaitable[tuple[bytes, datetime, datetime]]]


def _entries(rows: list[tuple]) -> list[CrlEntry]:
    return [CrlEntry(serial=r[0], revoked_at=utc(r[1]), reason=r[2]) for r in rows]


# Before every certificate: "no full CRL yet" in the expired-entry bound of a full CRL.
_EPOCH = datetime(1970, 1, 1)

# The CRL transaction signs inside (the number is allocated and the entries stamped under the fence): with
# 100,000 revocations that is seconds on a busy host, far above the bound for ordinary transactions.
CRL_TRANSACTION_TIMEOUT_SECONDS = 60.0


def next_crl_number(last: int | None, now: datetime) -> int:
    """The next CRL number of an issuer: the milliseconds of `now` since 1970, or one more than its last CRL's if
    that is as high (several in one millisecond, a clock behind).

    Not simply one more than the last: after a restore from a backup (`hapki db restore`) the database no longer
    holds the CRLs published since the backup was taken, and max+1 would publish their numbers again, with other
    contents; a relying party holding the later one would ignore the new CRL as older (RFC 5280 5.2.3: numbers
    strictly increase). Time-based numbers stay above every number published before, lost or not (Boulder numbers
    its CRLs by time too). Milliseconds keep the number exact in a float64 (the `hapki_crl_number` gauge)."""
    return max((last or 0) + 1, int(now.timestamp() * 1000))


class MariaDBRevocationStore:
    """CRLs and OCSP status on MariaDB/Galera. CLM writes `revocations`; CARA stamps and reads them."""

    def __init__(self, db: Database, *, actor: str = "cara") -> None:
        self._db = db
        self._actor = actor  # recorded on audit entries: service:member

    async def publish_crl(
        self, issuer: str, *, delta: bool, epoch: int, member: str, now: datetime, build: BuildCrl
    ) -> CrlRecord:
        """Allocate the next CRL number, collect its entries, sign (via `build`) and store it: one fenced transaction.

        The number is max+1 of the issuer's CRLs, read under a row lock in this transaction; UNIQUE (issuer,
        crl_number) refuses a concurrent twin and the CARA epoch fence refuses a stale member, so numbers strictly
        increase across failovers. A full CRL first stamps every revocation on no full CRL yet with its number,
        then lists every stamped revocation (the plain SELECT after the UPDATE sees exactly its own stamps plus
        older ones: a revocation committed meanwhile stays unstamped for the next CRL) except those, listed on an
        earlier CRL, of certificates that had expired when the previous full CRL was made (listed there, after
        their expiry: RFC 5280 3.3). A delta lists the revocations not on its base: unstamped, or stamped by a
        full CRL newer than the base.
        """

        async def body(cur: aiomysql.Cursor) -> CrlRecord:
            # Step 1: the number, serialised on this node by the lock; across nodes by UNIQUE and certification.
            await cur.execute("SELECT MAX(crl_number) FROM crls WHERE issuer = %s FOR UPDATE", (issuer,))
            number = next_crl_number((await cur.fetchone())[0], now)
            # Step 2: the entries.
            base = None
            if delta:
                await cur.execute(
                    "SELECT MAX(crl_number) FROM crls WHERE issuer = %s AND is_delta = 0", (issuer,))
                base = (await cur.fetchone())[0]
                if base is None:
                    raise NotFound(f"issuer {issuer} has no full CRL yet to base a delta on", {"issuer": issuer})
                await cur.execute(
                    "SELECT serial, revoked_at, reason FROM revocations"
                    " WHERE issuer = %s AND (crl_number IS NULL OR crl_number > %s)", (issuer, base))
            else:
                await cur.execute(
                    "UPDATE revocations SET crl_number = %s WHERE issuer = %s AND crl_number IS NULL", (number, issuer))
                # RFC 5280 3.3: an entry stays until it appeared on one regularly scheduled CRL issued after its
                # certificate expired. The previous full CRL was such a CRL for every listed certificate that had
                # expired when it was made: those entries go (a revocation new on this CRL is listed once, even of
                # an expired certificate), so full CRLs do not grow with every revocation ever made.
                await cur.execute(
                    "SELECT this_update FROM crls FORCE INDEX (ix_crls_latest) WHERE issuer = %s AND is_delta = 0"
                    " ORDER BY crl_number DESC LIMIT 1", (issuer,))
                previous = await cur.fetchone()
                await cur.execute(
                    "SELECT r.serial, r.revoked_at, r.reason FROM revocations r LEFT JOIN certificates c"
                    " ON c.issuer = r.issuer AND c.serial = r.serial WHERE r.issuer = %s AND r.crl_number IS NOT NULL"
                    " AND (r.crl_number = %s OR c.not_after IS NULL OR c.not_after >= %s)",
                    (issuer, number, _EPOCH if previous is None else previous[0]))
            entries = _entries(list(await cur.fetchall()))
            # Step 3: sign through the HSM (the caller's build runs it in a thread).
            der, this_update, next_update = await build(number, base, entries)
            # Step 4: store it; the fence and COMMIT follow in one round trip.
            record = CrlRecord(issuer=issuer, number=number, delta=delta, base=base, entries=len(entries),
                               this_update=this_update, next_update=next_update, der=der)
            await self._store_crl(cur, record, epoch=epoch, member=member, now=now, entry_id=entry_id)
            return record

        entry_id = time_ordered_id()  # one per publication: a retried body appends the same entry
        return await self._db.run(body, name="cara.crl_publish", fence=Fence(TIER, epoch),
                                  timeout=CRL_TRANSACTION_TIMEOUT_SECONDS)

    async def publish_arl(self, *, now: datetime, build: BuildCrl) -> CrlRecord:
        """The root's CRL, the ARL (issuer ROOT_CRL_ISSUER, served at /crl/root.crl): every issuing CA the root
        revoked (`hapki ca revoke-issuer`), numbered after the root's last CRL, signed via `build` (the root key, in
        a ceremony) and stored with its audit entry. Not fenced: no CARA member signs as the root."""

        async def body(cur: aiomysql.Cursor) -> CrlRecord:
            await cur.execute("SELECT MAX(crl_number) FROM crls WHERE issuer = %s FOR UPDATE", (ROOT_CRL_ISSUER,))
            number = next_crl_number((await cur.fetchone())[0], now)
            await cur.execute("SELECT cert_pem, revoked_at, revocation_reason FROM issuers WHERE revoked_at IS NOT NULL"
                              " ORDER BY revoked_at")
            entries = [CrlEntry(serial=format(x509.load_pem_x509_certificate(r[0].encode()).serial_number, "x"),
                                revoked_at=utc(r[1]), reason=r[2] or "unspecified") for r in await cur.fetchall()]
            der, this_update, next_update = await build(number, None, entries)
            record = CrlRecord(issuer=ROOT_CRL_ISSUER, number=number, delta=False, base=None, entries=len(entries),
                               this_update=this_update, next_update=next_update, der=der)
            await self._store_crl(cur, record, epoch=0, member="ceremony", now=now, entry_id=entry_id)
            return record

        entry_id = time_ordered_id()
        return await self._db.run(body, name="cara.arl_publish", timeout=CRL_TRANSACTION_TIMEOUT_SECONDS)

    async def _store_crl(self, cur: aiomysql.Cursor, record: CrlRecord, *, epoch: int, member: str, now: datetime,
                         entry_id: str) -> None:
        """The CRL's row and its audit entry `crl.published`. Hex on the wire, as the DER column is stored and read
        by every other statement (bytes arguments work too: hapki.runtime.db)."""
        der = record.der
        await append(cur, AuditRecord(
            kind=AuditKind.CRL_PUBLISHED, actor=self._actor, created_at=now, epoch=epoch or None, issuer=record.issuer,
            detail={"crl_number": record.number, "delta": record.delta, "base": record.base, "entries": record.entries,
                    "this_update": record.this_update.isoformat(), "next_update": record.next_update.isoformat(),
                    "der_sha256": hashlib.sha256(der).hexdigest()},
            id=entry_id), first=(
            "INSERT INTO crls (issuer, crl_number, is_delta, base_crl_number, entries, this_update, next_update,"
            " der, epoch, member, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, UNHEX(%s), %s, %s, %s)",
            (record.issuer, record.number, int(record.delta), record.base, record.entries,
             db_time(record.this_update), db_time(record.next_update), der.hex(), epoch, member, db_time(now)),
        ))

    async def latest_crl(self, issuer: str, *, delta: bool) -> CrlRecord | None:
        async def body(cur: aiomysql.Cursor) -> CrlRecord | None:
            await cur.execute(
                "SELECT crl_number, base_crl_number, entries, this_update, next_update, der FROM crls"
                " WHERE issuer = %s AND is_delta = %s ORDER BY crl_number DESC LIMIT 1", (issuer, int(delta)))
            row = await cur.fetchone()
            if row is None:
                return None
            return CrlRecord(issuer=issuer, number=row[0], delta=delta, base=row[1], entries=row[2],
                             this_update=utc(row[3]), next_update=utc(row[4]), der=bytes(row[5]))

        return await self._db.run(body, name="cara.crl_latest")

    async def crl_schedule(self, issuer: str) -> CrlSchedule:
        """When the newest full and delta CRLs (by number) were made, and whether a revocation is on no full CRL.

        Two seeks on ix_crls_latest, whatever the number of CRLs kept: the active member asks every poll (2 s),
        and a year of 5-minute deltas is ~105,000 rows (MAX(this_update) per kind scanned them all: 548 ms per
        call with 100,000 in a 64 MiB buffer pool; docs/PERFORMANCE.md, "CRLs kept")."""
        async def body(cur: aiomysql.Cursor) -> CrlSchedule:
            # FORCE INDEX: left to itself the optimizer walks uq_crls_number back from the newest CRL to the
            # newest full one (up to a full interval's deltas, 12 by default) instead of one seek.
            await cur.execute(
                "(SELECT 0, this_update FROM crls FORCE INDEX (ix_crls_latest) WHERE issuer = %s AND is_delta = 0"
                " ORDER BY crl_number DESC LIMIT 1) UNION ALL (SELECT 1, this_update FROM crls FORCE INDEX"
                " (ix_crls_latest) WHERE issuer = %s AND is_delta = 1 ORDER BY crl_number DESC LIMIT 1)",
                (issuer, issuer))
            latest = {bool(r[0]): utc(r[1]) for r in await cur.fetchall()}
            await cur.execute(
                "SELECT 1 FROM revocations WHERE issuer = %s AND crl_number IS NULL LIMIT 1", (issuer,))
            unlisted = await cur.fetchone() is not None
            return CrlSchedule(full_at=latest.get(False), delta_at=latest.get(True), unlisted=unlisted)

        return await self._db.run(body, name="cara.crl_schedule")

    async def serial_status(self, issuer: str, serial: str) -> SerialStatus:
        async def body(cur: aiomysql.Cursor) -> SerialStatus:
            await cur.execute(
                "SELECT r.revoked_at, r.reason FROM certificates c LEFT JOIN revocations r"
                " ON r.issuer = c.issuer AND r.serial = c.serial WHERE c.issuer = %s AND c.serial = %s",
                (issuer, serial))
            row = await cur.fetchone()
            if row is None:
                return SerialStatus(known=False)
            return SerialStatus(known=True, revoked_at=utc(row[0]), reason=row[1])

        return await self._db.run(body, name="cara.ocsp_status")

    async def revocations_since(self, issuer: str, after: int | None) -> tuple[list[str], int]:
        """Serials revoked since watermark `after`, and the new watermark: the newest CRL number (OCSP cache poll).

        One snapshot. A revocation committed after the previous poll's snapshot is either on no full CRL yet
        (crl_number NULL) or stamped by a CRL committed after that snapshot, whose number is above every number
        that snapshot saw (numbers are max+1 under a lock, UNIQUE per issuer). The same index range as a delta
        CRL's (ix_revocations_crl); serials stay in the answer until a CRL lists them (a few seconds)."""

        async def body(cur: aiomysql.Cursor) -> tuple[list[str], int]:
            await cur.execute("SELECT COALESCE(MAX(crl_number), 0) FROM crls WHERE issuer = %s", (issuer,))
            newest = int((await cur.fetchone())[0])
            if after is None:
                return [], newest
            await cur.execute(
                "SELECT serial FROM revocations WHERE issuer = %s AND (crl_number IS NULL OR crl_number > %s)",
                (issuer, after))
            return [row[0] for row in await cur.fetchall()], newest

        return await self._db.run(body, name="cara.ocsp_revocations")

    async def ocsp_signer(self, issuer: str) -> OcspSignerRecord | None:
        """The issuer's delegated OCSP signer valid longest (of two ending on the same second, the newer)."""

        async def body(cur: aiomysql.Cursor) -> OcspSignerRecord | None:
            await cur.execute(
                "SELECT cert_pem, key_id FROM ocsp_signers WHERE issuer = %s ORDER BY not_after DESC, created_at DESC"
                " LIMIT 1", (issuer,))
            row = await cur.fetchone()
            return None if row is None else OcspSignerRecord(issuer=issuer, cert_pem=row[0],
                                                             key_id=bytes.fromhex(row[1]))

        return await self._db.run(body, name="cara.ocsp_signer")

    async def ocsp_signer_certifying(self, issuer: str, *, serial: str, key_id: bytes, not_after: datetime,
                                     epoch: int, member: str, now: datetime) -> str:
        """Reserve `serial`, fenced, for this member's certifying the OCSP responder key `key_id` again: a signing
        intent (hapki.runtime.delegated_intents) and the audit entry `ocsp_signer.certifying`, before the HSM
        signature. Returns the intent's id; DuplicateKey: the serial is taken."""
        intent_id = time_ordered_id()
        entry = AuditRecord(kind=AuditKind.OCSP_SIGNER_CERTIFYING, actor=self._actor, created_at=now, epoch=epoch,
                            issuer=issuer, serial=serial,
                            detail={"key_id": key_id.hex(), "not_after": not_after.isoformat(), "intent_id": intent_id})

        async def body(cur: aiomysql.Cursor) -> None:
            await append(cur, entry, first=(delegated_intents.RESERVE_SQL, delegated_intents.reserve_args(
                intent_id, issuer=issuer, serial=serial, purpose=delegated_intents.OCSP_SIGNER, epoch=epoch,
                member=member, now=now)))

        await self._db.run(body, name="cara.ocsp_signer_certifying", fence=Fence(TIER, epoch))
        return intent_id

    async def save_ocsp_signer(self, record: OcspSignerRecord, *, not_after: datetime, now: datetime,
                               epoch: int | None = None, intent_id: str | None = None) -> None:
        """Store a new OCSP responder certificate (a new key from the ceremony, or the same key certified again)
        with its audit entry `ocsp_signer.created` (`replaces`: the key of the one in use before), and resolve
        its serial's intent `intent_id` as issued. `epoch`: fenced (the active member's renewal); None: the
        ceremony's (`hapki ca init`)."""
        serial = format(record.certificate.serial_number, "x")

        async def body(cur: aiomysql.Cursor) -> None:
            if intent_id is not None:
                await cur.execute(delegated_intents.ISSUED_SQL, delegated_intents.issued_args(
                    intent_id, now=now, purpose=delegated_intents.OCSP_SIGNER))
            await cur.execute("SELECT key_id, cert_pem FROM ocsp_signers WHERE issuer = %s ORDER BY not_after DESC"
                              " LIMIT 1", (record.issuer,))
            current = await cur.fetchone()
            replaced = None if current is None else OcspSignerRecord(record.issuer, current[1],
                                                                     bytes.fromhex(current[0]))
            await append(cur, AuditRecord(
                kind=AuditKind.OCSP_SIGNER_CREATED, actor=self._actor, created_at=now, epoch=epoch,
                issuer=record.issuer, serial=serial,
                detail={"key_id": record.key_id.hex(), "not_after": not_after.isoformat(),
                        "replaces": None if replaced is None else replaced.key_id.hex(),
                        "replaces_serial": (None if replaced is None
                                            else format(replaced.certificate.serial_number, "x")),
                        "cert_sha256": hashlib.sha256(record.cert_pem.encode()).hexdigest()},
                id=entry_id), first=(
                "INSERT INTO ocsp_signers (issuer, key_id, cert_pem, not_after, created_at, serial)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (record.issuer, record.key_id.hex(), record.cert_pem, db_time(not_after), db_time(now), serial)))

        entry_id = time_ordered_id()
        await self._db.run(body, name="cara.save_ocsp_signer", fence=None if epoch is None else Fence(TIER, epoch))
