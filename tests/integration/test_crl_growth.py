"""CARA's CRL schedule read stays a seek however many CRLs are kept.

The active member asks for it every `[crl] poll_seconds` (2 s). A year of 5-minute deltas is ~105,000 CRL rows;
the read used to take MAX(this_update) per kind, which read every one of them (548 ms per call with 100,000 rows
in a 64 MiB buffer pool). Held here by what the server reports it read (ANALYZE's r_rows) with 20,000 CRLs, on
the statement the store really sends, not by timing it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import aiomysql
import pytest

from hapki.cara.revocation_store import MariaDBRevocationStore
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database
from integration.conftest import own_statements, query

pytestmark = pytest.mark.integration

ISSUER = "crl-growth-test"
KEPT = 20_000  # every twelfth a full CRL, the rest deltas (the defaults: a full CRL an hour, a delta every 5 min)


@pytest.fixture
async def many_crls(env: LocalEnv, sql: aiomysql.Connection) -> AsyncIterator[None]:
    now = utcnow().replace(tzinfo=None)
    der = secrets.token_bytes(600)
    rows = [(ISSUER, n, int(n % 12 != 0), None, 3, now - timedelta(minutes=5 * (KEPT - n)),
             now + timedelta(days=1), der, 1, "cara-1", now) for n in range(1, KEPT + 1)]
    async with sql.cursor() as cur:
        for start in range(0, KEPT, 2_000):
            await cur.executemany(
                "INSERT INTO crls (issuer, crl_number, is_delta, base_crl_number, entries, this_update, next_update,"
                " der, epoch, member, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows[start:start + 2_000])
        await cur.execute("ANALYZE TABLE crls")
    try:
        yield
    finally:
        async with sql.cursor() as cur:
            await cur.execute("DELETE FROM crls WHERE issuer = %s", (ISSUER,))


async def test_the_crl_schedule_reads_two_rows_of_twenty_thousand(env: LocalEnv, sql: aiomysql.Connection,
                                                                  many_crls: None) -> None:
    db = Database(stack.database_config(env))
    try:
        with own_statements(with_values=True) as statements:
            schedule = await MariaDBRevocationStore(db).crl_schedule(ISSUER)
    finally:
        await db.close()
    newest_full = max(n for n in range(1, KEPT + 1) if n % 12 == 0)
    (full_at,), = await query(sql, "SELECT this_update FROM crls WHERE issuer = %s AND crl_number = %s",
                              (ISSUER, newest_full))
    (delta_at,), = await query(sql, "SELECT this_update FROM crls WHERE issuer = %s AND crl_number = %s",
                               (ISSUER, KEPT))
    assert schedule.full_at is not None and schedule.full_at.replace(tzinfo=None) == full_at
    assert schedule.delta_at is not None and schedule.delta_at.replace(tzinfo=None) == delta_at
    reads = [s for s in statements if " crls " in f" {s} " and s.lstrip().upper().startswith(("SELECT", "("))]
    assert reads, statements
    for statement in reads:
        plan = await query(sql, f"ANALYZE {statement}")
        # ANALYZE's columns: id, select_type, table, type, possible_keys, key, key_len, ref, rows, r_rows, ...
        read = [(row[2], float(row[9] or 0)) for row in plan if row[2] == "crls"]
        assert read and all(rows <= 1 for _, rows in read), (statement, plan)
