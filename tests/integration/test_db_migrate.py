"""`hapki db migrate` as an operator runs it (issue 6): migrations, then the service users' grants, idempotently.

Against a real MariaDB (LocalEnv's, TLS on), through the real CLI, into a database of its own, with an admin that
has what docs/SECURITY.md asks of it (ALL on the database WITH GRANT OPTION, CREATE USER) and nothing more.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import pymysql.err
import pytest
import tomli_w

from hapki.lab import stack
from hapki.lab.local import LocalEnv, _write_secret
from hapki.runtime.grants import CARA_USER, CLM_USER

pytestmark = pytest.mark.integration

DB = "hapki_migrate_test"
ADMIN = "hapki_dba"
HOST = "127.0.0.1"  # the env's service accounts connect from here (LocalEnv makes them for 127.0.0.1 and localhost)
ER_DBACCESS_DENIED = 1044
ER_TABLEACCESS_DENIED = 1142
ER_COLUMNACCESS_DENIED = 1143


@pytest.fixture(scope="module")
def admin_config(env: LocalEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config for a fresh database and an operator's admin account on it."""
    base = tmp_path_factory.mktemp("migrate")
    password = secrets.token_urlsafe(24)
    _write_secret(base / "admin.password", password)
    env.db.sql(f"CREATE DATABASE `{DB}`; CREATE USER '{ADMIN}'@'{HOST}' IDENTIFIED BY '{password}' REQUIRE SSL;"
               f"GRANT ALL PRIVILEGES ON `{DB}`.* TO '{ADMIN}'@'{HOST}' WITH GRANT OPTION;"
               f"GRANT CREATE USER ON *.* TO '{ADMIN}'@'{HOST}';")
    config = stack.database_config(env).model_dump(mode="json", exclude_none=True)
    config.update(user=ADMIN, password_file=str(base / "admin.password"), database=DB)
    path = base / "admin.toml"
    path.write_text(tomli_w.dumps({"database": config}))
    return path


def _migrate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*stack.hapki_command(), "db", "migrate", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _grants(env: LocalEnv, user: str) -> list[str]:
    return sorted(env.db.sql(f"SHOW GRANTS FOR '{user}'@'{HOST}'").splitlines())


async def _session(env: LocalEnv, user: str) -> AsyncIterator[aiomysql.Connection]:
    kwargs = {**env.db.connect_kwargs(user), "db": None}
    conn = await aiomysql.connect(**kwargs, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


async def _error(env: LocalEnv, user: str, statement: str) -> int | None:
    """The MariaDB error code ``user`` gets for ``statement`` (None: it ran)."""
    async for conn in _session(env, user):
        async with conn.cursor() as cur:
            try:
                await cur.execute(statement)
            except pymysql.err.Error as exc:
                return int(exc.args[0])
    return None


async def test_migrate_applies_the_grants_and_a_rerun_restores_them(env: LocalEnv, admin_config: Path) -> None:
    accounts = ["--account", f"{CLM_USER}@{HOST}", "--account", f"{CARA_USER}@{HOST}"]
    first = _migrate(admin_config, *accounts)
    assert first.returncode == 0, first.stderr
    assert "applied migrations: [1," in first.stdout and f"'{CLM_USER}'@'{HOST}'" in first.stdout

    # Least privilege on the new database: what each service needs, and the refusals that matter.
    assert await _error(env, CLM_USER, f"SELECT COUNT(*) FROM {DB}.requests") is None
    assert await _error(env, CLM_USER, f"INSERT INTO {DB}.certificates (serial) VALUES ('01')") == \
        ER_TABLEACCESS_DENIED
    assert await _error(env, CLM_USER, f"DROP TABLE {DB}.requests") == ER_TABLEACCESS_DENIED
    assert await _error(env, CARA_USER, f"UPDATE {DB}.requests SET status = 'issued' WHERE id = 'x'") is None
    assert await _error(env, CARA_USER, f"UPDATE {DB}.requests SET sign_request = 'x' WHERE id = 'x'") == \
        ER_COLUMNACCESS_DENIED
    assert await _error(env, CARA_USER, f"DELETE FROM {DB}.audit_entries") == ER_TABLEACCESS_DENIED
    granted = {user: _grants(env, user) for user in (CLM_USER, CARA_USER)}
    assert not any("ALL PRIVILEGES" in line for lines in granted.values() for line in lines), granted

    # Someone widens a service account by hand; the next migrate (nothing left to migrate) puts it back exactly.
    env.db.sql(f"GRANT DELETE ON `{DB}`.* TO '{CLM_USER}'@'{HOST}'")
    assert await _error(env, CLM_USER, f"DELETE FROM {DB}.certificates") is None
    again = _migrate(admin_config, *accounts)
    assert again.returncode == 0, again.stderr
    assert "applied migrations: none (up to date)" in again.stdout
    assert {user: _grants(env, user) for user in (CLM_USER, CARA_USER)} == granted
    assert await _error(env, CLM_USER, f"DELETE FROM {DB}.certificates") in (ER_TABLEACCESS_DENIED,
                                                                            ER_DBACCESS_DENIED)


async def test_migrate_names_a_missing_account_and_a_bad_one(admin_config: Path) -> None:
    missing = _migrate(admin_config, "--account", f"{CLM_USER}@10.99.99.99")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "10.99.99.99" in missing.stderr, missing.stderr
    for spec in (f"{CLM_USER}@x' OR '1", "root@%", CLM_USER):
        bad = _migrate(admin_config, "--account", spec)
        assert bad.returncode == 2 and "--account" in bad.stderr, (spec, bad.stderr)
    only = _migrate(admin_config, "--no-grants")
    assert only.returncode == 0 and "granted" not in only.stdout, only.stderr


# Indexes whose keys start with a serial (or with the issuer, then the serial), and why each may.
SERIAL_INDEXES = {
    ("certificates", "PRIMARY"): "a certificate by (issuer, serial): OCSP, revocation, CLM's lookups",
    ("signing_intents", "uq_intents_serial"): "the reservation's guarantee: a serial is never drawn twice",
    ("revocations", "PRIMARY"): "one row per revocation: rare",
    ("expiry_notices", "PRIMARY"): "one row per expiry window reached: rare, and not on the issuance path",
}


def test_no_index_is_keyed_by_a_serial_but_those_issuance_needs(env: LocalEnv) -> None:
    """Serials are random, so an index keyed by one takes every insert on a random page: its working set is all of
    it, and past a few hundred thousand certificates each such index read and wrote back a page per issuance
    (migration 0006 dropped three; docs/PERFORMANCE.md, Growth). A new one must be added here, with its reason."""
    database = stack.database_config(env).database
    rows = env.db.sql(
        "SELECT CONCAT(a.TABLE_NAME, ' ', a.INDEX_NAME) FROM information_schema.STATISTICS a"
        " LEFT JOIN information_schema.STATISTICS b ON b.TABLE_SCHEMA = a.TABLE_SCHEMA AND b.TABLE_NAME = a.TABLE_NAME"
        " AND b.INDEX_NAME = a.INDEX_NAME AND b.SEQ_IN_INDEX = 2"
        f" WHERE a.TABLE_SCHEMA = '{database}' AND a.SEQ_IN_INDEX = 1"
        " AND (a.COLUMN_NAME = 'serial' OR (a.COLUMN_NAME = 'issuer' AND b.COLUMN_NAME = 'serial'))")
    found = {tuple(line.split(" ")) for line in rows.splitlines() if line.strip()}
    assert found == set(SERIAL_INDEXES)
