"""The DESIGN.md invariants as queries on the database: each returns the rows that violate it (empty = holds).

Used by `hapki db check` (an operator's check of a running site), the lab tests, `hapki lab demo` and the fault
suite. Read-only. Two checks need every request to have finished (unresolved intents, lost requests): run them
after the system is quiet, or on a live site with `settle_seconds`, counting only rows older than that. Each
check reads its tables whole (the unique keys' indexes mostly): seconds with a million certificates.
"""

from __future__ import annotations

from typing import Any

import aiomysql

# name -> (what it means, SQL returning violating rows)
CHECKS: dict[str, tuple[str, str]] = {
    "duplicate_certificates": (
        "at most one certificate per request id",
        "SELECT request_id, COUNT(*) FROM certificates GROUP BY request_id HAVING COUNT(*) > 1",
    ),
    "duplicate_serials": (
        "serials unique per issuer (across certificates and intents)",
        "SELECT issuer, serial, COUNT(*) FROM signing_intents GROUP BY issuer, serial HAVING COUNT(*) > 1",
    ),
    "certificate_without_issued_intent": (
        "every certificate comes from an intent resolved as issued, with the same issuer, serial and epoch",
        # Everything a diagnosis needs in the row (the chaos suite prints new violating rows): which intent, in
        # which state, from which member and epoch, resolved why.
        "SELECT c.serial, c.request_id, c.intent_id, c.epoch, i.state, i.serial, i.epoch, i.member, i.resolution"
        " FROM certificates c LEFT JOIN signing_intents i ON i.id = c.intent_id"
        " WHERE i.id IS NULL OR i.state <> 'issued' OR i.issuer <> c.issuer OR i.serial <> c.serial"
        " OR i.epoch <> c.epoch",
    ),
    "issued_intent_without_certificate": (
        "every intent resolved as issued has its certificate",
        "SELECT i.id, i.request_id, i.serial, i.epoch, i.member, i.resolved_at FROM signing_intents i"
        " LEFT JOIN certificates c ON c.intent_id = i.id WHERE i.state = 'issued' AND i.purpose = 'certificate'"
        " AND c.intent_id IS NULL",
    ),
    # The delegated signers' certificates (OCSP responder, audit signer), which the issuing CA key signs too: their
    # serials are reserved the same way (migration 0010, hapki.runtime.delegated_intents).
    "delegated_intent_without_certificate": (
        "every intent of an OCSP responder's or audit signer's certificate resolved as issued has its certificate",
        "SELECT i.id, i.issuer, i.serial, i.purpose, i.epoch, i.member FROM signing_intents i"
        " WHERE i.state = 'issued' AND i.purpose <> 'certificate'"
        " AND NOT (i.purpose = 'ocsp_signer' AND EXISTS (SELECT 1 FROM ocsp_signers o"
        " WHERE o.issuer = i.issuer AND o.serial = i.serial))"
        " AND NOT (i.purpose = 'audit_signer' AND EXISTS (SELECT 1 FROM audit_signers a"
        " WHERE a.issuer = i.issuer AND a.serial = i.serial))",
    ),
    "delegated_certificate_without_issued_intent": (
        "every OCSP responder's and audit signer's certificate comes from an intent resolved as issued (those made "
        "before migration 0010 carry no serial and are not checked)",
        "SELECT 'ocsp_signer', o.issuer, o.serial FROM ocsp_signers o LEFT JOIN signing_intents i"
        " ON i.issuer = o.issuer AND i.serial = o.serial AND i.purpose = 'ocsp_signer' AND i.state = 'issued'"
        " WHERE o.serial IS NOT NULL AND i.id IS NULL"
        " UNION ALL SELECT 'audit_signer', a.issuer, a.serial FROM audit_signers a LEFT JOIN signing_intents i"
        " ON i.issuer = a.issuer AND i.serial = a.serial AND i.purpose = 'audit_signer' AND i.state = 'issued'"
        " WHERE a.serial IS NOT NULL AND i.id IS NULL",
    ),
    "unresolved_intents": (
        "every signing intent is resolved (issued or abandoned) once the system is quiet",
        "SELECT id, request_id, epoch, member FROM signing_intents WHERE state = 'reserved'",
    ),
    "stale_epoch_commits": (
        "only the member with the current epoch commits: no certificate of epoch e committed after the change to e+1",
        "SELECT c.serial, c.epoch, c.fence_seq, e.fence_seq FROM certificates c"
        " JOIN epoch_changes e ON e.tier = 'cara' AND e.epoch = c.epoch + 1 WHERE c.fence_seq > e.fence_seq",
    ),
    "certificate_before_its_epoch": (
        "a certificate's commit comes after the change to its own epoch",
        "SELECT c.serial, c.epoch FROM certificates c"
        " JOIN epoch_changes e ON e.tier = 'cara' AND e.epoch = c.epoch WHERE c.fence_seq <= e.fence_seq",
    ),
    "pending_requests": (
        "no accepted request is lost: every request reaches a final state once the system is quiet",
        "SELECT id, created_at FROM requests WHERE status = 'pending'",
    ),
}

QUIET_ONLY = {"unresolved_intents", "pending_requests"}
# On a live site the QUIET_ONLY checks take what is older than the settle window (`created_at` is written in UTC by
# the services; both queries end in their WHERE clause).
_OLDER_THAN = " AND created_at < UTC_TIMESTAMP(6) - INTERVAL %s SECOND"


async def violations(conn: aiomysql.Connection, *, quiet: bool = True,
                     settle_seconds: float | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Violating rows per invariant. quiet=False skips the checks that need a finished workload; settle_seconds
    runs them on a live site, on the rows older than that only (in flight is not lost)."""
    async with conn.cursor() as cur:
        return await check_all(cur, quiet=quiet, settle_seconds=settle_seconds)


async def check_all(cur: aiomysql.Cursor, *, quiet: bool = True,
                    settle_seconds: float | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """`violations` on a cursor: in one transaction (Database.run), every check reads one snapshot."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    for name, (_meaning, sql) in CHECKS.items():
        args: tuple[float, ...] | None = None
        if name in QUIET_ONLY:
            if not quiet:
                continue
            if settle_seconds is not None:
                sql, args = sql + _OLDER_THAN, (settle_seconds,)
        await cur.execute(sql, args)
        found[name] = list(await cur.fetchall())
    return found


def new_rows(before: dict[str, list[tuple[Any, ...]]],
             after: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """The violating rows of `after` that `before` did not hold, per invariant, sorted (every invariant named).

    What a test or a fault run made: a violation an earlier run left in the lab's database is that run's finding,
    reported there, and must not fail every later test."""
    return {name: sorted(set(map(tuple, rows)) - set(map(tuple, before.get(name, []))), key=str)
            for name, rows in after.items()}
