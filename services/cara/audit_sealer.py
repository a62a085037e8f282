"""The audit sealer: on the active CARA member, chains the audit entries every writer appended.

Writers append unchained entries inside their own transactions (hapki.runtime.audit.append), with one
`audit_unsealed` marker per transaction listing them, so they never contend for a shared row. Every
`seal_interval_seconds` the active member takes the oldest markers (by created_at, then id), gives their entries
the next sequence numbers and hashes in (created_at, id) order (deterministic), updates `audit_head` and removes
the markers, all in one transaction fenced by the CARA epoch: a member that lost its role cannot extend the chain,
and two members can never both extend it (one chain across the cluster).
At most every `checkpoint_interval_seconds` it then signs the head with the issuer's audit signer key in the HSM
(outside any transaction) and stores that checkpoint, fenced too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple

from dataclasses import dataclass

import aiomysql
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.cara.config import AuditConfig
from hapki.cara.role import Activity, run_while_active
from hapki.cara.store import TIER, in_marks
from hapki.runtime.audit import ENTRY_COLUMNS, GENESIS, checkpoint_message, link_hash, record_from_row
from hapki.runtime.db import Database, Fence, at_fence, db_time, execute_many

log = logging.getLogger("hapki.cara.audit")


@dataclass(frozen=True)
class CheckpointKey:
    """The issuer's audit signer: its HSM key signs checkpoints (hapki.runtime.audit.checkpoint_message)."""

    issuer: str
    key_id: bytes
    key: ec.EllipticCurvePrivateKey


class Sealed(NamedTuple):
    """What one sealing transaction did: entries chained, and whether markers were left for another."""

    chained: int
    more: bool


async def seal(db: Database, *, epoch: int, now: datetime, batch: int) -> Sealed:
    """Chain the entries of the oldest markers, about `batch` of them, under `epoch` (FencedOut if it is not current).

    A marker stands for the entries one transaction appended (migration 0007); a marker is taken whole, so a
    transaction may chain more than `batch` entries when its first marker alone lists more.
    Idempotent under whole-transaction retry: it starts from the head it reads, so a retry after a commit whose
    outcome was unknown just finds fewer (or no) entries to chain.
    """

    async def body(cur: aiomysql.Cursor) -> Sealed:
        # Step 1: the head, locked (only sealers touch it; one active member, so no one waits in practice), and
        # step 2: the oldest markers, as many as hold about `batch` entries (at least one marker). One round trip.
        (_, heads), (_, found) = await execute_many(cur, [
            ("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE", ()),
            ("SELECT entry_id, entry_ids FROM audit_unsealed ORDER BY created_at, entry_id LIMIT %s", (batch,)),
        ])
        seq, prev = (heads[0][0], heads[0][1]) if heads else (0, GENESIS)
        if not found:
            return Sealed(0, False)
        markers: list[str] = []
        ids: list[str] = []
        for marker, listed in found:
            members = listed.split(",") if listed else [marker]
            if markers and len(ids) + len(members) > batch:
                break
            markers.append(marker)
            ids += members
        more = len(markers) < len(found) or len(found) == batch
        # Step 3: their entries in order, each with its link if it has one already (then it is only unmarked). An
        # id without an entry (deleted before it was chained) is skipped; no link names it, so verification cannot
        # see it either (docs/ARCHITECTURE.md, what it cannot detect).
        await cur.execute(
            f"SELECT c.seq, {ENTRY_COLUMNS} FROM audit_entries e LEFT JOIN audit_chain c ON c.entry_id = e.id"
            f" WHERE e.id IN ({in_marks(ids)}) ORDER BY e.created_at, e.id", ids)
        links = []
        for row in await cur.fetchall():
            if row[0] is not None:
                continue
            seq += 1
            record = record_from_row(row[1:])
            digest = link_hash(prev, record, seq, detail=row[8])
            links.append((seq, record.id, prev, digest))
            prev = digest
        # Step 4: store the links, move the head, drop the markers: after the fence, in its round trip (at_fence),
        # COMMIT last. Epoch and time are the same for every link: sent once, as session variables.
        statements: list[tuple[str, Sequence[object]]] = []
        if links:
            statements += [
                ("SET @hapki_seal_epoch = %s, @hapki_sealed_at = %s", (epoch, db_time(now))),
                ("INSERT INTO audit_chain (seq, entry_id, prev_hash, hash, epoch, sealed_at) VALUES "
                 + ", ".join(["(%s, %s, %s, %s, @hapki_seal_epoch, @hapki_sealed_at)"] * len(links)),
                 [value for link in links for value in link]),
                ("INSERT INTO audit_head (id, seq, hash, updated_at) VALUES (1, %s, %s, @hapki_sealed_at)"
                 " ON DUPLICATE KEY UPDATE seq = VALUES(seq), hash = VALUES(hash), updated_at = VALUES(updated_at)",
                 (seq, prev)),
            ]
        statements.append((f"DELETE FROM audit_unsealed WHERE entry_id IN ({in_marks(markers)})", markers))
        for sql, args in statements:
            at_fence(sql, args)
        return Sealed(len(links), more)

    return await db.run(body, name="cara.audit_seal", fence=Fence(TIER, epoch))


async def sign_head(db: Database, sign: CheckpointKey, *, epoch: int, now: datetime) -> int | None:
    """Sign the head with the audit signer's HSM key and store the checkpoint, fenced, unless one covers it already.

    Returns the seq signed, or None. The HSM is asked outside any transaction (a slow HSM never holds a database
    lock); the checkpoint is stored only if the chain still has that hash at that seq.
    """

    async def head(cur: aiomysql.Cursor) -> tuple[int, str] | None:
        await cur.execute("SELECT h.seq, h.hash, (SELECT MAX(seq) FROM audit_checkpoints) FROM audit_head h")
        row = await cur.fetchone()
        return None if row is None or (row[2] or 0) >= row[0] else (row[0], row[1])

    # Step 1: what to sign.
    found = await db.run(head, name="cara.audit_head")
    if found is None:
        return None
    seq, digest = found
    # Step 2: the signature (HSM, in a thread).
    signed_at = db_time(now)
    signature = await asyncio.to_thread(
        sign.key.sign, checkpoint_message(seq, digest, signed_at, sign.issuer), ec.ECDSA(hashes.SHA256()))

    # Step 3: store it, fenced: only the active member speaks for the chain.
    async def store(cur: aiomysql.Cursor) -> None:
        await cur.execute(
            "INSERT INTO audit_checkpoints (seq, hash, signed_at, issuer, key_id, signature, epoch)"
            " SELECT seq, hash, %s, %s, %s, %s, %s FROM audit_chain WHERE seq = %s AND hash = %s",
            (signed_at, sign.issuer, sign.key_id.hex(), signature.hex(), epoch, seq, digest))

    await db.run(store, name="cara.audit_checkpoint", fence=Fence(TIER, epoch))
    # A copy outside the database: with it, cutting the chain together with its newest checkpoints shows too.
    log.info("audit checkpoint seq=%d hash=%s signed_at=%s key_id=%s signature=%s", seq, digest,
             signed_at.isoformat(), sign.key_id.hex(), signature.hex())
    return seq


async def waiting(db: Database) -> bool:
    """Whether any marker waits: one unfenced read, so that an idle sealer (4 ticks a second) writes nothing. A
    fenced transaction always commits its fence, a write every Galera node applies, entries to chain or not."""

    async def body(cur: aiomysql.Cursor) -> bool:
        ((_, rows),) = await execute_many(cur, [("SELECT 1 FROM audit_unsealed LIMIT 1", ())], commit=True)
        return bool(rows)

    return await db.run(body, name="cara.audit_waiting")


class AuditSealer:
    """Chains new audit entries every `seal_interval_seconds` while this member is active."""

    def __init__(self, *, db: Database, config: AuditConfig, activity: Activity, clock: Callable[[], datetime],
                 sign: CheckpointKey | None = None) -> None:
        self._db, self._config, self._activity, self._clock = db, config, activity, clock
        self._sign = sign  # None: chain without signed checkpoints (no audit signer yet: `hapki ca init` makes one)
        self._signed_at: datetime | None = None
        self.sealed = 0  # entries chained by this process (tests and health)

    def use_key(self, sign: CheckpointKey) -> None:
        """Sign checkpoints with this audit signer from now on (the new issuing CA's, after a rollover)."""
        self._sign = sign

    async def run(self) -> None:
        """The loop: on every member, but it seals only while the signer is active."""
        await run_while_active(self._activity, self.tick, what="audit sealing", logger=log,
                               wait=lambda: asyncio.sleep(self._config.seal_interval_seconds))

    async def tick(self, epoch: int) -> int:
        """Seal everything waiting now, a batch per transaction, then sign the head if a checkpoint is due; return
        how many entries were chained."""
        total = 0
        more = await waiting(self._db)
        while more:
            sealed = await seal(self._db, epoch=epoch, now=self._clock(), batch=self._config.batch)
            total += sealed.chained
            more = sealed.more
        self.sealed += total
        now = self._clock()
        if self._sign is not None and (self._signed_at is None or (now - self._signed_at).total_seconds()
                                       >= self._config.checkpoint_interval_seconds):
            self._signed_at = now  # also on failure: an HSM outage is retried (and logged) once an interval
            await sign_head(self._db, self._sign, epoch=epoch, now=now)
        return total
