"""The audit log: entries appended inside state-changing transactions, one hash chain, and its verification.

Writers (CLM and CARA) call `append(cur, record)` inside the transaction body that makes the change, so no change
commits without its entry and no entry exists without its change. Appending is unchained and conflict-free (a new
row in `audit_entries` plus its marker in `audit_unsealed`), so concurrent writers on any Galera node never wait
for one another. The active CARA member's sealer (hapki.cara.audit_sealer) chains entries later, under the CARA
epoch fence: entry `seq` gets

    hash(seq) = SHA-256(bytes.fromhex(hash(seq - 1)) || canonical(entry, seq)),   hash(0) = 64 zeros,

and `audit_head` holds the newest (seq, hash). `verify(...)` walks the chain and names the first break: an
altered entry, a removed one (a gap, or a chain link without its entry), a reordered one (an entry whose content
belongs at another position), or a truncated tail (the head names more than the chain holds).
"""

from __future__ import annotations

import enum
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiomysql
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hapki.runtime.db import Database, db_time

GENESIS = "0" * 64
# Read a chain this many links at a time (memory stays bounded by the chain, not by one huge result).
_PAGE = 5000


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
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

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
    """A deterministic entry id: for kinds appended at most once per cause (append(dedupe=True) keeps the first)."""
    return hashlib.sha256(canonical_json([str(p) for p in parts]).encode()).hexdigest()[:32]


_INSERT = (
    "INSERT INTO audit_entries (id, kind, actor, epoch, request_id, issuer, serial, detail, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s){keep};"
    " INSERT INTO audit_unsealed (entry_id, created_at) VALUES (%s, %s){keep_marker}"
)


async def append(cur: aiomysql.Cursor, record: AuditRecord, *, dedupe: bool = False,
                 first: tuple[str, Sequence[object]] | None = None) -> int:
    """Append `record` in the caller's transaction, in one round trip; return the row count of `first`, if given.

    `first`: one statement of the caller's (SQL, args) sent ahead in the same round trip, to save one on hot paths.
    Build the record outside the transaction body, so a retried body appends the same id: a second copy is then
    a duplicate key, never a second entry. `dedupe`: an entry with the same (derived) id is kept, this one dropped.
    """
    created = _stored(record.created_at)
    # Not INSERT IGNORE: that would also swallow other errors (and warn); a duplicate only keeps the first.
    sql = _INSERT.format(keep=" ON DUPLICATE KEY UPDATE id = id" if dedupe else "",
                         keep_marker=" ON DUPLICATE KEY UPDATE entry_id = entry_id" if dedupe else "")
    args: tuple[object, ...] = (
        record.id, record.kind.value, record.actor[:128], record.epoch, record.request_id, record.issuer,
        record.serial, record.detail_json(), created, record.id, created,
    )
    if first is not None:
        sql, args = f"{first[0]}; {sql}", (*first[1], *args)
    await cur.execute(sql, args)
    rowcount = cur.rowcount
    for _ in range(2 if first is not None else 1):
        await cur.nextset()  # the later statements' results: their errors surface here
    return rowcount


# --- verification --------------------------------------------------------------------------------------


class Problem(str, enum.Enum):
    """What is wrong at a position of the chain."""

    ALTERED = "altered"  # the entry (or its link) does not hash to what the chain says
    REMOVED = "removed"  # a position without its link, or a link without its entry
    REORDERED = "reordered"  # the entry is intact but sits at another position than where it was chained
    TRUNCATED = "truncated"  # the head names newer links than the chain holds, or the head row is gone
    HEAD_MISMATCH = "head_mismatch"  # the head's hash is not the chain's hash at that position
    UNSEALED = "unsealed"  # an entry left unchained longer than the grace period (sealer down, or tampering)
    ANCHOR_MISMATCH = "anchor_mismatch"  # an externally recorded (seq, hash) is not in the chain any more
    CHECKPOINT_INVALID = "checkpoint_invalid"  # a checkpoint's signature does not verify with a trusted audit key
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # a signed checkpoint's hash is not the chain's: chain rewritten


@dataclass(frozen=True)
class ChainLink:
    """One row of `audit_chain` with its entry (None: the entry row is missing) and its stored detail text."""

    seq: int
    entry_id: str
    prev_hash: str
    hash: str
    entry: AuditRecord | None
    detail: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A signed head: the sealer's statement that the chain had `hash` at `seq` at `signed_at` (naive UTC)."""

    seq: int
    hash: str
    signed_at: datetime
    issuer: str
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        return checkpoint_message(self.seq, self.hash, self.signed_at, self.issuer)


def checkpoint_message(seq: int, digest: str, signed_at: datetime, issuer: str) -> bytes:
    """What an audit signer signs (domain-separated, so the signature means nothing anywhere else)."""
    return b"hapki audit checkpoint v1\n" + canonical_json(
        {"seq": seq, "hash": digest, "signed_at": _time(signed_at), "issuer": issuer}).encode("ascii")


def checkpoint_valid(checkpoint: Checkpoint, key: ec.EllipticCurvePublicKey | None) -> bool:
    if key is None:
        return False
    try:
        key.verify(checkpoint.signature, checkpoint.message(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Finding:
    seq: int
    problem: Problem
    message: str
    entry_id: str | None = None


@dataclass(frozen=True)
class AuditReport:
    """The result of a verification. `ok` iff no finding; `findings[0]` is the first break in chain order."""

    sealed: int
    unsealed: int
    head_seq: int | None
    head_hash: str | None
    findings: list[Finding]
    signed_seq: int | None = None  # the newest valid checkpoint: the chain up to here is signed by the HSM key

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        if self.ok:
            signed = "no signed checkpoint" if self.signed_seq is None else f"signed up to seq {self.signed_seq}"
            return (f"audit chain intact: {self.sealed} entries chained, head seq {self.head_seq} "
                    f"hash {self.head_hash}; {signed}; {self.unsealed} not chained yet")
        first = self.findings[0]
        more = f" (and {len(self.findings) - 1} more findings)" if len(self.findings) > 1 else ""
        return f"audit chain broken at seq {first.seq}: {first.problem.value}: {first.message}{more}"


def _hash_of(link: ChainLink, seq: int, prev_hash: str) -> str | None:
    return None if link.entry is None else link_hash(prev_hash, link.entry, seq, detail=link.detail)


# Searching where a broken entry belongs costs a pass over the chain; after this many findings, skip it.
_CLASSIFY_LIMIT = 10


def _origin(link: ChainLink, links: Sequence[ChainLink]) -> int | None:
    """Where `link`'s entry was chained, if that is another position and its content is intact there."""
    if link.entry is None:
        return None
    for other in links:
        if other.seq == link.seq:
            continue
        # The link moved with its entry (its seq was changed), or the entry moved to another link.
        if _hash_of(link, other.seq, link.prev_hash) == link.hash or \
                _hash_of(link, other.seq, other.prev_hash) == other.hash:
            return other.seq
    return None


def verify(
    links: Iterable[ChainLink],
    head: tuple[int, str] | None,
    *,
    unsealed: Sequence[tuple[str, datetime]] = (),
    now: datetime | None = None,
    grace: timedelta = timedelta(seconds=60),
    anchor: tuple[int, str] | None = None,
    checkpoints: Sequence[Checkpoint] = (),
    keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
) -> AuditReport:
    """Check the chain (links in any order), the head row, the signed checkpoints and the unchained entries; pure.

    `unsealed`: (entry id, created_at naive UTC) of entries not chained yet; with `now` (naive UTC), those older
    than `grace` are findings. `anchor`: a (seq, hash) recorded elsewhere earlier, which must still be in the chain.
    `checkpoints` must verify with `keys` (key id hex -> trusted audit signer public key) and match the chain.
    """
    ordered = sorted(links, key=lambda link: link.seq)
    by_hash = {link.hash: link.seq for link in ordered}
    findings: list[Finding] = []
    prev = GENESIS
    expected = 1
    for link in ordered:
        if link.seq > expected:
            findings.append(Finding(expected, Problem.REMOVED,
                                    f"links {expected}..{link.seq - 1} are missing from the chain"))
        expected = link.seq + 1
        entry = link.entry
        if entry is None:
            findings.append(Finding(link.seq, Problem.REMOVED, f"entry {link.entry_id} is missing", link.entry_id))
            prev = link.hash
            continue
        intact = _hash_of(link, link.seq, link.prev_hash) == link.hash
        linked = link.prev_hash == prev
        prev = link.hash
        if intact and linked:
            continue
        # A break right after a reported one is usually its echo (the predecessor changed), not a new problem.
        echo = bool(findings) and findings[-1].seq >= link.seq - 1
        origin = _origin(link, ordered) if len(findings) < _CLASSIFY_LIMIT else None
        what = f"entry {entry.id} ({getattr(entry.kind, 'value', entry.kind)})"
        if not linked and not echo and link.prev_hash != GENESIS and link.prev_hash not in by_hash:
            findings.append(Finding(link.seq, Problem.REMOVED, f"the entry chained before {what} is gone", entry.id))
        elif origin is not None:
            findings.append(Finding(link.seq, Problem.REORDERED, f"{what} was chained at seq {origin}", entry.id))
        elif intact and echo:
            continue
        else:
            findings.append(Finding(link.seq, Problem.ALTERED, f"{what} does not match its hash", entry.id))
    last = ordered[-1] if ordered else None
    if head is None:
        if last is not None:
            findings.append(Finding(last.seq, Problem.TRUNCATED, "the head row is missing"))
    else:
        head_seq, head_hash = head
        if last is None or head_seq > last.seq:
            start = 1 if last is None else last.seq + 1
            findings.append(Finding(start, Problem.TRUNCATED,
                                    f"the head is at seq {head_seq} but the chain ends at {start - 1}"))
        elif head_seq < last.seq:
            findings.append(Finding(head_seq + 1, Problem.HEAD_MISMATCH,
                                    f"links after the head (seq {head_seq}) up to {last.seq}: not written by the sealer"))
        elif head_hash != last.hash:
            findings.append(Finding(head_seq, Problem.HEAD_MISMATCH, "the head hash differs from the chain's"))
    signed_seq = None
    hash_at = {link.seq: link.hash for link in ordered}
    for checkpoint in sorted(checkpoints, key=lambda c: c.seq):
        if not checkpoint_valid(checkpoint, (keys or {}).get(checkpoint.key_id)):
            findings.append(Finding(checkpoint.seq, Problem.CHECKPOINT_INVALID,
                                    f"the checkpoint at seq {checkpoint.seq} is not signed by a trusted audit key"))
        elif checkpoint.seq not in hash_at:
            if last is None or checkpoint.seq > last.seq:
                findings.append(Finding((last.seq if last else 0) + 1, Problem.TRUNCATED,
                                        f"a signed checkpoint names seq {checkpoint.seq}; the chain ends before it"))
        elif hash_at[checkpoint.seq] != checkpoint.hash:
            findings.append(Finding(checkpoint.seq, Problem.CHECKPOINT_MISMATCH,
                                    f"the chain at seq {checkpoint.seq} is not what was signed at "
                                    f"{checkpoint.signed_at:%Y-%m-%d %H:%M:%S}: rewritten up to here"))
        else:
            signed_seq = checkpoint.seq
    if anchor is not None:
        anchor_seq, anchor_hash = anchor
        if by_hash.get(anchor_hash) != anchor_seq:
            findings.append(Finding(anchor_seq, Problem.ANCHOR_MISMATCH,
                                    f"the recorded hash {anchor_hash[:16]}... is not at seq {anchor_seq} any more"))
    if now is not None:
        for entry_id, created in unsealed:
            if now - created > grace:
                findings.append(Finding(expected, Problem.UNSEALED,
                                        f"entry {entry_id} of {created:%Y-%m-%d %H:%M:%S} is not chained", entry_id))
                break
    findings.sort(key=lambda f: f.seq)
    return AuditReport(sealed=len(ordered), unsealed=len(unsealed), head_seq=head[0] if head else None,
                       head_hash=head[1] if head else None, findings=findings, signed_seq=signed_seq)


# --- reading the chain from the database ---------------------------------------------------------------


def record_from_row(row: Sequence[Any]) -> AuditRecord:
    """An AuditRecord from (id, kind, actor, epoch, request_id, issuer, serial, detail, created_at)."""
    return AuditRecord(id=row[0], kind=row[1], actor=row[2], epoch=row[3], request_id=row[4], issuer=row[5],
                       serial=row[6], detail=json.loads(row[7]), created_at=row[8])


ENTRY_COLUMNS = "e.id, e.kind, e.actor, e.epoch, e.request_id, e.issuer, e.serial, e.detail, e.created_at"


async def read_chain(db: Database) -> tuple[list[ChainLink], tuple[int, str] | None, list[tuple[str, datetime]]]:
    """Every chain link with its entry, the head, and the entries not chained (the chain is read in pages)."""
    links: list[ChainLink] = []

    async def page(cur: aiomysql.Cursor, after: int) -> list[tuple]:
        await cur.execute(
            f"SELECT c.seq, c.entry_id, c.prev_hash, c.hash, {ENTRY_COLUMNS} FROM audit_chain c"
            " LEFT JOIN audit_entries e ON e.id = c.entry_id WHERE c.seq > %s ORDER BY c.seq LIMIT %s",
            (after, _PAGE))
        return list(await cur.fetchall())

    after = -1  # seq values are positive, but a tampered row may carry anything
    while True:
        rows = await db.run(lambda cur, a=after: page(cur, a), name="audit.read_chain")
        for row in rows:
            entry = None if row[4] is None else record_from_row(row[4:])
            links.append(ChainLink(row[0], row[1], row[2], row[3], entry, None if row[4] is None else row[11]))
        if len(rows) < _PAGE:
            break
        after = rows[-1][0]

    async def rest(cur: aiomysql.Cursor) -> tuple[tuple[int, str] | None, list[tuple[str, datetime]]]:
        await cur.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
        head = await cur.fetchone()
        await cur.execute(
            "SELECT e.id, e.created_at FROM audit_entries e LEFT JOIN audit_chain c ON c.entry_id = e.id"
            " WHERE c.entry_id IS NULL ORDER BY e.created_at, e.id")
        return (None if head is None else (head[0], head[1])), [(r[0], r[1]) for r in await cur.fetchall()]

    head, unsealed = await db.run(rest, name="audit.read_head")
    return links, head, unsealed


async def read_checkpoints(db: Database) -> tuple[list[Checkpoint], dict[str, ec.EllipticCurvePublicKey]]:
    """Every checkpoint, and the audit signer keys whose certificate its issuer (as stored) really signed."""

    async def body(cur: aiomysql.Cursor) -> tuple[list[tuple], list[tuple]]:
        await cur.execute("SELECT seq, hash, signed_at, issuer, key_id, signature FROM audit_checkpoints")
        checkpoints = list(await cur.fetchall())
        await cur.execute("SELECT s.key_id, s.cert_pem, i.cert_pem FROM audit_signers s"
                          " JOIN issuers i ON i.name = s.issuer")
        return checkpoints, list(await cur.fetchall())

    rows, signers = await db.run(body, name="audit.read_checkpoints")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for key_id, cert_pem, issuer_pem in signers:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(issuer_pem.encode()))
        except (ValueError, TypeError, InvalidSignature):
            continue  # not certified by its issuer: its checkpoints are reported as invalid
        public_key = cert.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            keys[key_id] = public_key
    checkpoints = []
    for row in rows:
        try:
            signature = bytes.fromhex(row[5])
        except ValueError:
            signature = b""
        checkpoints.append(Checkpoint(seq=row[0], hash=row[1], signed_at=row[2], issuer=row[3], key_id=row[4],
                                      signature=signature))
    return checkpoints, keys


async def verify_database(db: Database, *, now: datetime, grace: timedelta = timedelta(seconds=60),
                          anchor: tuple[int, str] | None = None) -> AuditReport:
    """Read the chain from `db` and verify it (what `hapki audit verify` and the lab's fault tests call)."""
    links, head, unsealed = await read_chain(db)
    checkpoints, keys = await read_checkpoints(db)
    return verify(links, head, unsealed=unsealed, now=db_time(now), grace=grace, anchor=anchor,
                  checkpoints=checkpoints, keys=keys)


# --- audit signers (keys in the HSM, certified by the issuing CA) --------------------------------------


async def save_audit_signer(db: Database, *, issuer: str, cert: x509.Certificate, key_id: bytes, actor: str,
                            now: datetime) -> None:
    """Store an issuer's audit signer (made by `hapki ca init`), with its own audit entry."""
    cert_pem = cert.public_bytes(Encoding.PEM).decode()
    entry = AuditRecord(
        kind=AuditKind.AUDIT_SIGNER_CREATED, actor=actor, created_at=now, issuer=issuer,
        serial=format(cert.serial_number, "x"),
        detail={"key_id": key_id.hex(), "not_after": cert.not_valid_after_utc.isoformat(),
                "cert_sha256": hashlib.sha256(cert_pem.encode()).hexdigest()})

    async def body(cur: aiomysql.Cursor) -> None:
        await append(cur, entry, first=(
            "INSERT INTO audit_signers (issuer, key_id, cert_pem, not_after, created_at) VALUES (%s, %s, %s, %s, %s)",
            (issuer, key_id.hex(), cert_pem, db_time(cert.not_valid_after_utc), db_time(now))))

    await db.run(body, name="audit.save_signer")


async def audit_signer(db: Database, issuer: str) -> tuple[bytes, x509.Certificate] | None:
    """The issuer's audit signer valid longest: (CKA_ID, certificate), or None before `hapki ca init` made one."""

    async def body(cur: aiomysql.Cursor) -> tuple | None:
        await cur.execute("SELECT key_id, cert_pem FROM audit_signers WHERE issuer = %s ORDER BY not_after DESC"
                          " LIMIT 1", (issuer,))
        return await cur.fetchone()

    row = await db.run(body, name="audit.signer")
    return None if row is None else (bytes.fromhex(row[0]), x509.load_pem_x509_certificate(row[1].encode()))
