"""Database privileges: the one table of what each service may do, and the SQL that provisions it.

Every service connects as its own MariaDB user with exactly the privileges its SQL needs (issue 6): CLM (the RA)
records requests and revocations but cannot write certificates; CARA (the CA) writes certificates and the outcome
columns of a request but not what CLM approved (``requests.sign_request``, ``profile``, ``csr_sha256``...); the
audit tables are insert-only for both, except the three chain tables the CARA sealer maintains. Schema changes
belong to an admin (migrator) user; a service only checks that the schema is current (hapki.runtime.migrate).

Grants name tables and columns, which must exist: they are applied after the migrations, by whoever provisions
the database: `provision` (the ``mariadb`` client as root: hapki.lab.local.MariaDB and the lab's Galera bootstrap)
or `apply` (an admin's connection: ``hapki db migrate``, what an operator runs). Keep this table
in step with the SQL in services/clm, services/cara and hapki.runtime.audit: the integration tests run every
service flow under these users, so a missing privilege fails them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import aiomysql
import pymysql.err

from hapki.contracts.errors import ProvisioningRefused
from hapki.runtime.db import Database
from hapki.runtime.migrate import SCHEMA_TABLE_SQL, available, split_statements

__all__ = ["ADMIN_USER", "GRANTS", "SERVICE_USERS", "Grant", "account", "apply", "grant_sql", "migration_sql",
           "provision", "revoke_sql"]


@dataclass(frozen=True)
class Grant:
    """Privileges of one user on one table: whole-table privileges and column-level UPDATE."""

    table: str
    privileges: tuple[str, ...] = ("SELECT",)
    update_columns: tuple[str, ...] = ()


CLM_USER = "hapki_clm"
CARA_USER = "hapki_cara"
ADMIN_USER = "hapki"  # migrations, provisioning, the lab's invariant checks and `hapki audit verify`
SERVICE_USERS = (CLM_USER, CARA_USER)

_SCHEMA = Grant("schema_migrations")  # services check that every migration is applied; only the admin migrates

GRANTS: Mapping[str, Sequence[Grant]] = {
    CLM_USER: (
        _SCHEMA,
        Grant("issuers"),
        # Records requests; later only flags them (revoked) and schedules expiry checks.
        Grant("requests", ("SELECT", "INSERT"), update_columns=("revoked", "expiry_check_at")),
        # INSERT ... ON DUPLICATE KEY UPDATE needs UPDATE on every inserted column (MariaDB): whole-table UPDATE on
        # the tables CLM alone owns and writes that way.
        Grant("request_names", ("SELECT", "INSERT", "UPDATE")),
        Grant("certificates"),  # read only: CLM cannot write certificates
        Grant("revocations", ("SELECT", "INSERT")),
        Grant("expiry_notices", ("SELECT", "INSERT", "UPDATE")),
        Grant("audit_entries", ("INSERT",)),
        Grant("audit_unsealed", ("INSERT",)),
    ),
    CARA_USER: (
        _SCHEMA,
        # hapki ca init, rollover (the default) and revoke-issuer (the revocation columns)
        Grant("issuers", ("SELECT", "INSERT"), update_columns=("is_default", "revoked_at", "revocation_reason")),
        # The outcome columns only: never sign_request, profile, csr_sha256, requester or the names CLM approved.
        Grant("requests", update_columns=("status", "serial", "issuer", "not_after", "updated_at", "error_code",
                                          "error_message")),
        Grant("epochs", ("SELECT", "INSERT", "UPDATE")),
        Grant("epoch_changes", ("INSERT",)),
        Grant("signing_intents", ("SELECT", "INSERT"), update_columns=("state", "resolved_at", "resolution")),
        Grant("certificates", ("SELECT", "INSERT")),  # numbered by the fence as inserted: never updated
        Grant("revocations", update_columns=("crl_number",)),  # stamps revocations onto a CRL
        Grant("crls", ("SELECT", "INSERT")),
        Grant("ocsp_signers", ("SELECT", "INSERT")),
        Grant("audit_entries", ("SELECT", "INSERT")),  # the sealer reads entries to chain them
        Grant("audit_unsealed", ("SELECT", "INSERT", "DELETE")),  # the sealer removes what it chained
        Grant("audit_chain", ("SELECT", "INSERT")),
        Grant("audit_head", ("SELECT", "INSERT", "UPDATE")),  # its one row, upserted by the sealer
        Grant("audit_signers", ("SELECT", "INSERT")),
        Grant("audit_checkpoints", ("SELECT", "INSERT")),
        Grant("backups", ("SELECT",)),  # the newest one's age, a metric (written by `hapki db backup`, the admin)
    ),
}


def grant_sql(database: str, accounts: Mapping[str, Sequence[str]], *, usage_first: bool = True) -> list[str]:
    """GRANT statements for each service user's accounts (``{user: ["'user'@'host'", ...]}``).

    Starts by revoking everything the account holds, so re-provisioning also removes privileges this table no
    longer lists (and the ALL an older deployment gave its service users). ``usage_first``: see revoke_sql.
    """
    statements: list[str] = []
    for user, names in accounts.items():
        for account in names:
            statements.extend(revoke_sql(account) if usage_first else revoke_sql(account)[1:])
            for grant in GRANTS[user]:
                privileges = list(grant.privileges)
                if grant.update_columns:
                    privileges.append(f"UPDATE ({', '.join(grant.update_columns)})")
                statements.append(f"GRANT {', '.join(privileges)} ON `{database}`.`{grant.table}` TO {account}")
    return statements


def revoke_sql(account: str) -> list[str]:
    # REVOKE ALL fails with 1141 when the account holds nothing; an innocuous USAGE grant first makes it total.
    # (That GRANT needs global GRANT OPTION, which root has; an admin with CREATE USER revokes without it.)
    return [f"GRANT USAGE ON *.* TO {account}", f"REVOKE ALL PRIVILEGES, GRANT OPTION FROM {account}"]


def migration_sql(database: str, applied: set[int]) -> list[str]:
    """The pending migrations as SQL scripts for the ``mariadb`` client (provisioning over the root socket)."""
    scripts = [f"CREATE DATABASE IF NOT EXISTS `{database}`;\nUSE `{database}`;\n{SCHEMA_TABLE_SQL};"]
    for version, name, sql in available():
        if version in applied:
            continue
        scripts.append(
            f"USE `{database}`;\nSET SESSION sql_notes = 0;\n" + "".join(f"{s};\n" for s in split_statements(sql)) +
            f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({version}, '{name}', UTC_TIMESTAMP(6));"
        )
    return scripts


def provision(run_sql: Callable[[str], str], database: str, accounts: Mapping[str, Sequence[str]]) -> None:
    """Apply pending migrations, then the grants, with an admin's ``run_sql`` (the ``mariadb`` client, batch mode).

    The users themselves (and their passwords) are the caller's: they differ per environment (host part, TLS).
    """
    run_sql(migration_sql(database, set())[0])
    applied = {int(v) for v in run_sql(f"SELECT version FROM `{database}`.schema_migrations").split()}
    for script in migration_sql(database, applied)[1:]:
        run_sql(script)
    run_sql(";\n".join(grant_sql(database, accounts)) + ";")


# A host part of an account: names, addresses, and MariaDB's wildcards; nothing that could close the quotes.
_HOST = re.compile(r"^[A-Za-z0-9.%_:-]{1,255}$")
# What an admin without the right privileges, or naming an account that does not exist, gets from MariaDB.
_REFUSALS = {
    1044: "the admin lacks privileges on the database: it needs ALL PRIVILEGES ON `{db}`.* WITH GRANT OPTION",
    1045: "the admin lacks privileges: it needs ALL PRIVILEGES ON `{db}`.* WITH GRANT OPTION and CREATE USER",
    1142: "the admin lacks privileges on the database: it needs ALL PRIVILEGES ON `{db}`.* WITH GRANT OPTION",
    1227: "the admin lacks CREATE USER (needed to revoke what a service account held before)",
    1133: "a service account does not exist: create it first (CREATE USER ... IDENTIFIED BY ... REQUIRE SSL)",
    1269: "a service account does not exist: create it first (CREATE USER ... IDENTIFIED BY ... REQUIRE SSL)",
    1410: "the admin may not grant these privileges: it needs ALL PRIVILEGES ON `{db}`.* WITH GRANT OPTION",
}


def account(user: str, host: str) -> str:
    """The quoted account ``'user'@'host'`` of a service user; ValueError for anything else."""
    if user not in GRANTS:
        raise ValueError(f"not a service user: {user!r} (known: {', '.join(GRANTS)})")
    if not _HOST.match(host):
        raise ValueError(f"not an account host: {host!r} (letters, digits, '.', '%', '_', ':', '-')")
    return f"'{user}'@'{host}'"


async def apply(db: Database, database: str, accounts: Mapping[str, Sequence[str]]) -> None:
    """Apply GRANTS to the service accounts as the admin ``db`` connects as, after the migrations.

    Idempotent: every run revokes what each account holds and grants exactly the table again (so a privilege
    removed from the table, or granted by hand, is gone afterwards). The accounts and their passwords are the
    operator's (created with REQUIRE SSL); a missing account or a missing admin privilege is ProvisioningRefused.
    """
    statements = grant_sql(database, accounts, usage_first=False)

    async def run(cur: aiomysql.Cursor) -> None:
        for statement in statements:
            try:
                await cur.execute(statement)
            except pymysql.err.MySQLError as exc:
                code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
                if code not in _REFUSALS:
                    raise
                raise ProvisioningRefused(f"{_REFUSALS[code].format(db=database)}; MariaDB {code} on: {statement}",
                                          {"errno": code}) from None

    await db.run(run, name="grants.apply")
