"""Verifying the audit log: `verify` (pure) names the first break of the chain; `verify_database` reads one
snapshot and verifies it (what `hapki audit verify` and the lab's fault tests call).

Findings: an altered entry (it does not hash to its link), a removed one (a gap in seq, a link without its entry,
or a link whose predecessor is gone), a reordered one (intact, but hashed for another position), a truncated tail
(the head or a signed checkpoint names more than the chain holds), links beyond the head, a checkpoint that does
not verify with a trusted audit key or does not match the chain (recomputed after an alteration), entries left
unchained past a grace period, and an externally kept (seq, hash) no longer in the chain.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiomysql
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.runtime.audit import ENTRY_COLUMNS, GENESIS, AuditRecord, checkpoint_message, link_hash, record_from_row
from hapki.runtime.db import Database, db_time

# Read a chain this many links at a time (memory stays bounded by the chain, not by one huge result).
_PAGE = 5000
# One consistent read of the whole log: seconds, not the 3 s bound of a service transaction (a log of a few
# hundred thousand entries takes several seconds on a busy host).
READ_TIMEOUT_SECONDS = 300.0


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
    """The hash `link`'s entry has at `seq` after `prev_hash`; None when there is none (no entry, garbage hash)."""
    if link.entry is None:
        return None
    try:
        return link_hash(prev_hash, link.entry, seq, detail=link.detail)
    except ValueError:  # prev_hash is not hex: tampered
        return None


_HEX64 = re.compile(r"[0-9a-f]{64}")
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
        if not linked and not echo and _HEX64.fullmatch(link.prev_hash) and link.prev_hash != GENESIS \
                and link.prev_hash not in by_hash:
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
            findings.append(Finding(
                head_seq + 1, Problem.HEAD_MISMATCH,
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


@dataclass(frozen=True)
class AuditLog:
    """Everything verification reads, from one snapshot of the database."""

    links: list[ChainLink]
    head: tuple[int, str] | None
    unsealed: list[tuple[str, datetime]]
    checkpoints: list[Checkpoint]
    keys: dict[str, ec.EllipticCurvePublicKey]


async def read_log(db: Database, *, root: x509.Certificate | None = None) -> AuditLog:
    """The chain with its entries, the head, the unchained entries, the checkpoints and the trusted audit keys.

    One transaction, so one consistent snapshot (InnoDB repeatable read): a sealer running meanwhile cannot make
    the head look ahead of the chain. The chain is fetched in pages.
    """

    async def body(cur: aiomysql.Cursor) -> tuple[list[tuple], tuple | None, list[tuple], list[tuple], list[tuple]]:
        await cur.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
        head = await cur.fetchone()
        chain: list[tuple] = []
        after = -(2**63)  # seq values are positive, but a tampered row may carry anything
        while True:
            await cur.execute(
                f"SELECT c.seq, c.entry_id, c.prev_hash, c.hash, {ENTRY_COLUMNS} FROM audit_chain c"
                " LEFT JOIN audit_entries e ON e.id = c.entry_id WHERE c.seq > %s ORDER BY c.seq LIMIT %s",
                (after, _PAGE))
            rows = list(await cur.fetchall())
            chain += rows
            if len(rows) < _PAGE:
                break
            after = rows[-1][0]
        await cur.execute(
            "SELECT e.id, e.created_at FROM audit_entries e LEFT JOIN audit_chain c ON c.entry_id = e.id"
            " WHERE c.entry_id IS NULL ORDER BY e.created_at, e.id")
        unsealed = list(await cur.fetchall())
        await cur.execute("SELECT seq, hash, signed_at, issuer, key_id, signature FROM audit_checkpoints")
        checkpoints = list(await cur.fetchall())
        await cur.execute("SELECT s.key_id, s.cert_pem, i.cert_pem FROM audit_signers s"
                          " JOIN issuers i ON i.name = s.issuer")
        return chain, head, unsealed, checkpoints, list(await cur.fetchall())

    chain, head, unsealed, checkpoints, signers = await db.run(body, name="audit.read", timeout=READ_TIMEOUT_SECONDS)
    links = [ChainLink(row[0], row[1], row[2], row[3], None if row[4] is None else record_from_row(row[4:]),
                       None if row[4] is None else row[11]) for row in chain]
    return AuditLog(links=links, head=None if head is None else (head[0], head[1]),
                    unsealed=[(r[0], r[1]) for r in unsealed], checkpoints=[_checkpoint(r) for r in checkpoints],
                    keys=_trusted_keys(signers, root))


def _checkpoint(row: Sequence[Any]) -> Checkpoint:
    try:
        signature = bytes.fromhex(row[5])
    except ValueError:  # tampered: verifies as invalid
        signature = b""
    return Checkpoint(seq=row[0], hash=row[1], signed_at=row[2], issuer=row[3], key_id=row[4], signature=signature)


def _trusted_keys(signers: Iterable[Sequence[Any]],
                  root: x509.Certificate | None = None) -> dict[str, ec.EllipticCurvePublicKey]:
    """Audit signer keys (key id -> public key) whose certificate their issuer's certificate (as stored) signed,
    and, given a `root`, whose issuer that root signed."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for key_id, cert_pem, issuer_pem in signers:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
            cert.verify_directly_issued_by(issuer)
            if root is not None:
                issuer.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue  # not certified by its issuer (or the root): its checkpoints are reported as invalid
        public_key = cert.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            keys[key_id] = public_key
    return keys


async def verify_database(db: Database, *, now: datetime, grace: timedelta = timedelta(seconds=60),
                          anchor: tuple[int, str] | None = None, root: x509.Certificate | None = None) -> AuditReport:
    """Read one snapshot of the log from `db` and verify it (what `hapki audit verify` and the lab's tests call).
    `root`: trust only audit signers of issuing CAs this root certified."""
    log = await read_log(db, root=root)
    return verify(log.links, log.head, unsealed=log.unsealed, now=db_time(now), grace=grace, anchor=anchor,
                  checkpoints=log.checkpoints, keys=log.keys)
