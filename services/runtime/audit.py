"""The audit log: entries appended inside state-changing transactions, and the one hash chain they form.

Writers (CLM and CARA) call `append(cur, record)` inside the transaction body that makes the change, so no change
commits without its entry and no entry exists without its change. Appending is unchained and conflict-free (new
rows in `audit_entries` plus one marker in `audit_unsealed` listing them, whatever their number), so concurrent
writers on any Galera node never wait for one another. The active CARA member's sealer (hapki.cara.audit_sealer)
chains entries later, under the CARA epoch fence: entry `seq` gets

    hash(seq) = SHA-256(bytes.fromhex(hash(seq - 1)) || canonical(entry, seq)),   hash(0) = 64 zeros,

and `audit_head` holds the newest (seq, hash); at most every checkpoint interval the sealer also signs the head
with the issuer's audit signer key in the HSM (`checkpoint_message`). Verification: hapki.runtime.audit_verify.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiomysql
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hapki.runtime import delegated_intents
from hapki.runtime.db import Database, db_time, execute_many
from hapki.runtime.ids import time_ordered_id

GENESIS = "0" * 64


class AuditKind(str, enum.Enum):
    """What changed. Values are stored and hashed: never rename one, add new ones."""

    REQUEST_RECORDED = "request.recorded"  # CLM accepted a request (pending)
    REQUEST_REJECTED = "request.rejected"  # CLM refused a well-formed request by policy
    REQUEST_FAILED = "request.failed"  # CARA refused to sign a request (final)
    CERTIFICATE_ISSUED = "certificate.issued"  # CARA stored a certificate
    INTENT_ABANDONED = "intent.abandoned"  # a reserved serial/signing intent will never get a certificate
    CERTIFICATE_REVOKED = "certificate.revoked"  # CLM recorded a revocation
    CRL_PUBLISHED = "crl.published"  # CARA signed and stored a full or delta CRL
    OCSP_SIGNER_CREATED = "ocsp_signer.created"  # a delegated OCSP signer was created (or rotated: `replaces`)
    ISSUER_CREATED = "issuer.created"  # a CA ceremony stored an issuing CA
    EPOCH_CHANGED = "epoch.changed"  # a CARA member became active under a new epoch
    AUDIT_SIGNER_CREATED = "audit_signer.created"  # a key for signing audit checkpoints was created
    SIGNING_REFUSED = "signing.refused"  # CARA refused a signing request that is not what CLM recorded (forged)
    OCSP_SIGNER_CERTIFYING = "ocsp_signer.certifying"  # the active CARA member is about to renew the OCSP
    # responder's certificate (serial, key, not_after): recorded before the HSM signs it, so a certificate signed
    # by a member that died before storing it is accounted for (a later ocsp_signer.created names its serial)
    ISSUER_DEFAULT = "issuer.default"  # new certificates are issued by this issuing CA from now on (a rollover:
    # `replaces` names the one before); the one before keeps answering OCSP and publishing CRLs
    ISSUER_REVOKED = "issuer.revoked"  # its root revoked an issuing CA (`hapki ca revoke-issuer`): on the ARL
    DATABASE_BACKED_UP = "database.backed_up"  # `hapki db backup` wrote a backup (its file's SHA-256); the backup
    # itself holds the entries before this one
    DATABASE_RESTORED = "database.restored"  # `hapki db restore` loaded a backup here (its SHA-256 and time)


@dataclass(frozen=True)
class AuditRecord:
    """One audit entry. `detail` must be JSON-serialisable; it is stored as canonical JSON and hashed as stored."""

    kind: AuditKind
    actor: str
    created_at: datetime  # aware UTC, or naive UTC as read back from the database
    epoch: int | None = None
    request_id: str | None = None
    issuer: str | None = None
    serial: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=time_ordered_id)

    def detail_json(self) -> str:
        return canonical_json(self.detail)


def canonical_json(value: object) -> str:
    """Sorted keys, no spaces, ASCII only: one byte string per value, whatever wrote it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _stored(value: datetime) -> datetime:
    return db_time(value) if value.tzinfo else value


def _time(value: datetime) -> str:
    """Naive UTC to the microsecond, as DATETIME(6) stores it."""
    return _stored(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(record: AuditRecord, seq: int, *, detail: str | None = None) -> bytes:
    """The bytes hashed for `record` at chain position `seq` (every field, the position included).

    `detail` is the stored detail text when hashing a row read back (hashed exactly as stored).
    """
    return canonical_json({
        "seq": seq, "id": record.id, "kind": record.kind.value if isinstance(record.kind, AuditKind) else record.kind,
        "actor": record.actor, "epoch": record.epoch, "request_id": record.request_id, "issuer": record.issuer,
        "serial": record.serial, "detail": record.detail_json() if detail is None else detail,
        "created_at": _time(record.created_at),
    }).encode("ascii")


def link_hash(prev_hash: str, record: AuditRecord, seq: int, *, detail: str | None = None) -> str:
    """hash(seq) = SHA-256(prev_hash bytes || canonical(record, seq)), as 64 lowercase hex digits."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(record, seq, detail=detail)).hexdigest()


def derived_id(*parts: object) -> str:
    """A deterministic entry id: for kinds appended at most once per cause (a second append is a DuplicateKey)."""
    return hashlib.sha256(canonical_json([str(p) for p in parts]).encode()).hexdigest()[:32]


# Plain inserts: the audit tables are insert-only for the services (hapki.runtime.grants), so no ON DUPLICATE KEY
# UPDATE (it needs the UPDATE privilege). A duplicate id fails the caller's transaction with DuplicateKey.
_ENTRY_COLUMNS = "id, kind, actor, epoch, request_id, issuer, serial, detail, created_at"
_ENTRY_VALUES = "(%s, %s, %s, %s, %s, %s, %s, %s, %s)"


async def append(cur: aiomysql.Cursor, record: AuditRecord, *,
                 first: tuple[str, Sequence[object]] | None = None) -> int:
    """Append `record` in the caller's transaction, in one round trip; return the row count of `first`, if given.

    `first`: one statement of the caller's (SQL, args) sent ahead in the same round trip, to save one on hot paths.
    Build the record outside the transaction body, so a retried body appends the same id: a second copy is then
    a duplicate key, never a second entry. A kind appended at most once per cause uses a derived id and a
    transaction of its own that treats DuplicateKey as "already recorded" (the first one is kept).
    """
    return (await append_many(cur, [record], first=[first] if first is not None else []))[0]


def append_statements(records: Sequence[AuditRecord]) -> list[tuple[str, Sequence[object]]]:
    """The two statements (SQL, args) that append `records`: the entries, and one marker standing for all of them
    until the sealer chains them (migration 0007). For a body that sends them itself (db.at_fence)."""
    if not records:
        raise ValueError("appending needs at least one record")
    entries: list[object] = []
    oldest: datetime | None = None
    for record in records:
        created = _stored(record.created_at)
        entries += [record.id, record.kind.value, record.actor[:128], record.epoch, record.request_id,
                    record.issuer, record.serial, record.detail_json(), created]
        oldest = created if oldest is None or created < oldest else oldest
    # One marker for all of them (0007): keyed by the first entry, ordered by the oldest, listing the rest.
    listed = ",".join(record.id for record in records) if len(records) > 1 else None
    return [
        (f"INSERT INTO audit_entries ({_ENTRY_COLUMNS}) VALUES {', '.join([_ENTRY_VALUES] * len(records))}", entries),
        ("INSERT INTO audit_unsealed (entry_id, created_at, entry_ids) VALUES (%s, %s, %s)",
         (records[0].id, oldest, listed)),
    ]


async def append_many(cur: aiomysql.Cursor, records: Sequence[AuditRecord], *,
                      first: Sequence[tuple[str, Sequence[object]]] = (), commit: bool = False) -> list[int]:
    """Append `records` (one or more) as `append` does, all in one round trip with the statements `first` ahead.

    Two inserts whatever the number of records (a signing batch appends one entry per certificate): the entries,
    and one marker standing for all of them until the sealer chains them (migration 0007).
    Returns the row count of each statement of `first`, then of the audit_entries insert. `commit`: COMMIT in
    the same round trip (the last step of an unfenced body; see hapki.runtime.db.execute_many).
    """
    results = await execute_many(cur, [*first, *append_statements(records)], commit=commit)
    return [count for count, _ in results[:-1]]


def checkpoint_message(seq: int, digest: str, signed_at: datetime, issuer: str) -> bytes:
    """What an audit signer signs (domain-separated, so the signature means nothing anywhere else)."""
    return b"hapki audit checkpoint v1\n" + canonical_json(
        {"seq": seq, "hash": digest, "signed_at": _time(signed_at), "issuer": issuer}).encode("ascii")


def record_from_row(row: Sequence[Any]) -> AuditRecord:
    """An AuditRecord from (id, kind, actor, epoch, request_id, issuer, serial, detail, created_at).

    Hash it with `detail=` the stored text (row[7]): that, not its parse, is what was chained.
    """
    try:
        detail = json.loads(row[7])
    except ValueError:  # tampered: the stored text will not hash to the link's hash either
        detail = {"unparseable": row[7]}
    return AuditRecord(id=row[0], kind=row[1], actor=row[2], epoch=row[3], request_id=row[4], issuer=row[5],
                       serial=row[6], detail=detail if isinstance(detail, dict) else {"value": detail},
                       created_at=row[8])


# The columns record_from_row takes, of audit_entries aliased `e`.
ENTRY_COLUMNS = "e.id, e.kind, e.actor, e.epoch, e.request_id, e.issuer, e.serial, e.detail, e.created_at"


# --- audit signers (keys in the HSM, certified by the issuing CA) --------------------------------------


async def save_audit_signer(db: Database, *, issuer: str, cert: x509.Certificate, key_id: bytes, actor: str,
                            now: datetime, intent_id: str | None = None) -> None:
    """Store an issuer's audit signer (made by `hapki ca init`), with its own audit entry, and resolve its serial's
    intent `intent_id` (hapki.runtime.delegated_intents) as issued."""
    cert_pem = cert.public_bytes(Encoding.PEM).decode()
    serial = format(cert.serial_number, "x")
    entry = AuditRecord(
        kind=AuditKind.AUDIT_SIGNER_CREATED, actor=actor, created_at=now, issuer=issuer, serial=serial,
        detail={"key_id": key_id.hex(), "not_after": cert.not_valid_after_utc.isoformat(),
                "cert_sha256": hashlib.sha256(cert_pem.encode()).hexdigest()})

    async def body(cur: aiomysql.Cursor) -> None:
        if intent_id is not None:
            await cur.execute(delegated_intents.ISSUED_SQL, delegated_intents.issued_args(
                intent_id, now=now, purpose=delegated_intents.AUDIT_SIGNER))
        await append(cur, entry, first=(
            "INSERT INTO audit_signers (issuer, key_id, cert_pem, not_after, created_at, serial)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (issuer, key_id.hex(), cert_pem, db_time(cert.not_valid_after_utc), db_time(now), serial)))

    await db.run(body, name="audit.save_signer")


async def audit_signer(db: Database, issuer: str) -> tuple[bytes, x509.Certificate] | None:
    """The issuer's audit signer valid longest: (CKA_ID, certificate), or None before `hapki ca init` made one."""

    async def body(cur: aiomysql.Cursor) -> tuple | None:
        await cur.execute("SELECT key_id, cert_pem FROM audit_signers WHERE issuer = %s ORDER BY not_after DESC"
                          " LIMIT 1", (issuer,))
        return await cur.fetchone()

    row = await db.run(body, name="audit.signer")
    return None if row is None else (bytes.fromhex(row[0]), x509.load_pem_x509_certificate(row[1].encode()))
