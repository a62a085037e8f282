"""Least privilege in the database (issue 6): each service user can do what its SQL needs and nothing more.

The service flows themselves (issuance, revocation, CRLs, audit sealing) run under these users in the other
integration tests; here the refusals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiomysql
import pymysql.err
import pytest

from hapki.lab.local import LocalEnv
from hapki.runtime.grants import CARA_USER, CLM_USER

pytestmark = pytest.mark.integration

ER_TABLEACCESS_DENIED = 1142
ER_COLUMNACCESS_DENIED = 1143
ER_DBACCESS_DENIED = 1044


async def _session(env: LocalEnv, user: str) -> AsyncIterator[aiomysql.Connection]:
    conn = await aiomysql.connect(**env.db.connect_kwargs(user), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
async def clm_sql(env: LocalEnv) -> AsyncIterator[aiomysql.Connection]:
    async for conn in _session(env, CLM_USER):
        yield conn


@pytest.fixture
async def cara_sql(env: LocalEnv) -> AsyncIterator[aiomysql.Connection]:
    async for conn in _session(env, CARA_USER):
        yield conn


async def _refused(conn: aiomysql.Connection, statement: str, args: object = None) -> int:
    async with conn.cursor() as cur:
        with pytest.raises(pymysql.err.Error) as info:
            await cur.execute(statement, args)
    return info.value.args[0]


async def test_clm_user_cannot_insert_a_certificate(clm_sql: aiomysql.Connection) -> None:
    code = await _refused(clm_sql, "INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem,"
                                   " not_before, not_after, created_at) VALUES ('x', '01', 'r', 'i', 1, 'pem',"
                                   " NOW(), NOW(), NOW())")
    assert code == ER_TABLEACCESS_DENIED
    assert await _refused(clm_sql, "UPDATE certificates SET cert_pem = 'forged'") == ER_TABLEACCESS_DENIED
    assert await _refused(clm_sql, "DELETE FROM certificates") == ER_TABLEACCESS_DENIED


async def test_audit_tables_are_insert_only_for_services(clm_sql: aiomysql.Connection,
                                                         cara_sql: aiomysql.Connection) -> None:
    for conn in (clm_sql, cara_sql):
        assert await _refused(conn, "UPDATE audit_entries SET detail = '{}'") == ER_TABLEACCESS_DENIED
        assert await _refused(conn, "DELETE FROM audit_entries") == ER_TABLEACCESS_DENIED
        assert await _refused(conn, "UPDATE audit_checkpoints SET signature = ''") == ER_TABLEACCESS_DENIED
        assert await _refused(conn, "DELETE FROM audit_chain") == ER_TABLEACCESS_DENIED
    # CLM writes entries but never reads, chains or removes them.
    assert await _refused(clm_sql, "SELECT COUNT(*) FROM audit_entries") == ER_TABLEACCESS_DENIED
    assert await _refused(clm_sql, "DELETE FROM audit_unsealed") == ER_TABLEACCESS_DENIED


async def test_cara_user_cannot_change_what_clm_approved(cara_sql: aiomysql.Connection) -> None:
    for column in ("sign_request", "profile", "csr_sha256", "requester", "revoked"):
        code = await _refused(cara_sql, f"UPDATE requests SET {column} = %s WHERE id = 'x'", ("forged",))
        assert code == ER_COLUMNACCESS_DENIED, column
    assert await _refused(cara_sql, "INSERT INTO requests (id) VALUES ('x')") == ER_TABLEACCESS_DENIED
    assert await _refused(cara_sql, "UPDATE request_names SET value = 'evil.example'") == ER_TABLEACCESS_DENIED
    async with cara_sql.cursor() as cur:  # what CARA does need still works
        await cur.execute("UPDATE requests SET status = 'issued' WHERE id = 'no-such-request'")


async def test_clm_user_cannot_set_issuance_outcomes(clm_sql: aiomysql.Connection) -> None:
    for column in ("status", "serial", "issuer"):
        code = await _refused(clm_sql, f"UPDATE requests SET {column} = 'x' WHERE id = 'x'")
        assert code == ER_COLUMNACCESS_DENIED, column
    assert await _refused(clm_sql, "UPDATE epochs SET epoch = epoch + 1") == ER_TABLEACCESS_DENIED


async def test_service_users_cannot_change_the_schema(clm_sql: aiomysql.Connection,
                                                      cara_sql: aiomysql.Connection) -> None:
    for conn in (clm_sql, cara_sql):
        assert await _refused(conn, "CREATE TABLE evil (id INT)") in (ER_TABLEACCESS_DENIED, ER_DBACCESS_DENIED)
        assert await _refused(conn, "DROP TABLE requests") == ER_TABLEACCESS_DENIED
        assert await _refused(conn, "INSERT INTO schema_migrations VALUES (999, 'x', NOW())") == ER_TABLEACCESS_DENIED
