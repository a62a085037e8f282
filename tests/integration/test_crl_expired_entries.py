"""Full CRLs drop the entries of expired certificates once one CRL made after the expiry listed them (RFC 5280
3.3), so they do not grow with every revocation ever made; a revocation new on a CRL is listed once even if its
certificate had expired. On MariaDB, through the store's fenced publication, with the CRLs' times chosen."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiomysql
import pytest

from hapki.cara.ports import CrlEntry
from hapki.cara.revocation_store import MariaDBRevocationStore
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.db import Database
from integration.conftest import query

pytestmark = pytest.mark.integration

ISSUER = "crl-expiry-test"
T1 = datetime(2031, 1, 1, tzinfo=UTC)
EXPIRES = {"a": T1 + timedelta(days=365), "b": T1 + timedelta(days=1), "c": T1 - timedelta(days=10)}


@pytest.fixture
async def rows(sql: aiomysql.Connection) -> AsyncIterator[aiomysql.Connection]:
    """Certificates a (valid throughout), b (expires a day after the first CRL), c (expired before it)."""
    async with sql.cursor() as cur:
        for serial, not_after in EXPIRES.items():
            await cur.execute(
                "INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem, not_before,"
                " not_after, created_at) VALUES (%s, %s, %s, %s, 1, 'test', %s, %s, %s)",
                (ISSUER, serial, uuid.uuid4().hex, uuid.uuid4().hex, (not_after - timedelta(days=400)).replace(
                    tzinfo=None), not_after.replace(tzinfo=None), T1.replace(tzinfo=None)))
    try:
        yield sql
    finally:
        async with sql.cursor() as cur:
            for table in ("crls", "revocations", "certificates"):
                await cur.execute(f"DELETE FROM {table} WHERE issuer = %s", (ISSUER,))


async def revoke(sql: aiomysql.Connection, serial: str) -> None:
    async with sql.cursor() as cur:
        await cur.execute("INSERT INTO revocations (issuer, serial, reason, revoked_at, requester) VALUES"
                          " (%s, %s, 'key_compromise', %s, 'tests')", (ISSUER, serial, T1.replace(tzinfo=None)))


async def test_expired_entries_leave_full_crls_after_one_crl_past_their_expiry(env: LocalEnv, services, rows) -> None:
    sql = rows
    (epoch,), = await query(sql, "SELECT epoch FROM epochs WHERE tier = 'cara'")  # the running CARA's (services)
    db = Database(stack.database_config(env))
    store = MariaDBRevocationStore(db, actor="tests")
    listed: dict[int, set[str]] = {}

    async def full_crl_at(this_update: datetime) -> set[str]:
        async def build(number: int, base: int | None, entries: list[CrlEntry]) -> tuple[bytes, datetime, datetime]:
            listed[number] = {entry.serial for entry in entries}
            return b"crl", this_update, this_update + timedelta(days=7)

        record = await store.publish_crl(ISSUER, delta=False, epoch=epoch, member="cara-1", now=this_update,
                                         build=build)
        assert record.entries == len(listed[record.number])
        return listed[record.number]

    try:
        await revoke(sql, "a")
        await revoke(sql, "b")
        assert await full_crl_at(T1) == {"a", "b"}
        # b expired a day after T1: the next full CRL is the first made after its expiry and still lists it ...
        assert await full_crl_at(T1 + timedelta(days=2)) == {"a", "b"}
        # ... and the one after that no longer does.
        assert await full_crl_at(T1 + timedelta(days=3)) == {"a"}
        # c had expired before any of these CRLs and is revoked only now: listed once, then gone.
        await revoke(sql, "c")
        assert await full_crl_at(T1 + timedelta(days=4)) == {"a", "c"}
        assert await full_crl_at(T1 + timedelta(days=5)) == {"a"}
    finally:
        await db.close()
