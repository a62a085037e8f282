"""Versioned SQL migrations: files `migrations/NNNN_name.sql`, applied once each, in order.

Safe to run from several services at once: every statement is idempotent (IF NOT EXISTS) and the
version row has a primary key, so a concurrent runner just finds it applied.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from importlib import resources

import aiomysql

from hapki.contracts.errors import DuplicateKey
from hapki.runtime.db import Database

log = logging.getLogger("hapki.migrate")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in version order."""
    found = []
    for entry in resources.files("hapki.runtime").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def split_statements(sql: str) -> list[str]:
    """The statements of a migration file: its comment lines dropped, split at semicolons outside quotes (a COMMENT
    text may hold one; a plain split cut such a statement in two, and only `hapki db migrate` and the services'
    start, not the mariadb client that provisions test databases, choked on it)."""
    return split_sql("\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--")))


def split_sql(text: str) -> list[str]:
    """Statements split at semicolons outside quotes ('...', "...", `...`, with backslash escapes), stripped."""
    parts, current, quote, escaped = [], [], "", False
    for ch in text:
        if escaped:
            escaped = False
        elif quote and ch == "\\":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == ";":
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


# A migration rewrites tables and backfills columns: minutes on a large database, not the milliseconds of the
# bound for ordinary transactions. A DDL cut off by that bound would go on running on the server while the retry
# started it again on another node.
MIGRATION_TIMEOUT_SECONDS = 3600.0

SCHEMA_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INT NOT NULL PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at DATETIME(6) NOT NULL"
    ") ENGINE=InnoDB"
)


async def migrate(db: Database) -> list[int]:
    """Apply every migration not yet recorded; return the versions applied now.

    A schema that is already current costs one SELECT and needs no DDL privilege: the services run this at start
    as their own least-privileged users (hapki.runtime.grants), and only an admin ever applies anything.
    """

    async def ensure_table(cur: aiomysql.Cursor) -> set[int]:
        await cur.execute("SET SESSION sql_notes = 0")  # "already exists" notes are expected, not warnings
        await cur.execute("SELECT COUNT(*) FROM information_schema.tables"
                          " WHERE table_schema = DATABASE() AND table_name = 'schema_migrations'")
        row = await cur.fetchone()
        if not row or not row[0]:
            await cur.execute(SCHEMA_TABLE_SQL)
        await cur.execute("SELECT version FROM schema_migrations")
        return {row[0] for row in await cur.fetchall()}

    done = await db.run(ensure_table, name="migrate.read", timeout=MIGRATION_TIMEOUT_SECONDS)
    applied = []
    for version, name, sql in available():
        if version in done:
            continue

        async def apply(cur: aiomysql.Cursor, sql: str = sql, version: int = version, name: str = name) -> None:
            await cur.execute("SET SESSION sql_notes = 0")
            for statement in split_statements(sql):
                await cur.execute(statement)
            await cur.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (version, name, datetime.now(UTC).replace(tzinfo=None)),
            )

        try:
            await db.run(apply, name=f"migrate.{version:04d}", timeout=MIGRATION_TIMEOUT_SECONDS)
        except DuplicateKey:
            log.info("migration %04d applied concurrently by another runner", version)
            continue
        log.info("applied migration %04d_%s", version, name)
        applied.append(version)
    return applied
