"""The grants table names only tables and columns the migrations create, and never DDL for services."""

from __future__ import annotations

import re

from hapki.runtime.grants import GRANTS, grant_sql, migration_sql
from hapki.runtime.migrate import available


def _schema() -> dict[str, str]:
    """table -> the SQL text that defines or alters it (crude, but enough to find column names)."""
    text = "\n".join(sql for _, _, sql in available())
    tables: dict[str, str] = {"schema_migrations": "version name applied_at"}
    for match in re.finditer(r"(?:CREATE TABLE IF NOT EXISTS|ALTER TABLE)\s+(\w+)\s*(.*?)(?:;|\Z)", text, re.S):
        tables[match.group(1)] = tables.get(match.group(1), "") + match.group(2)
    return tables


def test_grants_name_existing_tables_and_columns() -> None:
    schema = _schema()
    for user, grants in GRANTS.items():
        for grant in grants:
            assert grant.table in schema, (user, grant.table)
            for column in grant.update_columns:
                assert re.search(rf"\b{column}\b", schema[grant.table]), (user, grant.table, column)


def test_services_get_no_ddl_and_no_audit_rewrites() -> None:
    for user, grants in GRANTS.items():
        for grant in grants:
            assert set(grant.privileges) <= {"SELECT", "INSERT", "UPDATE", "DELETE"}, (user, grant)
            if grant.table in ("audit_entries", "audit_signers", "audit_checkpoints", "audit_chain"):
                assert set(grant.privileges) <= {"SELECT", "INSERT"} and not grant.update_columns, (user, grant)


def test_clm_cannot_write_certificates_and_cara_cannot_touch_approvals() -> None:
    clm = {g.table: g for g in GRANTS["hapki_clm"]}
    cara = {g.table: g for g in GRANTS["hapki_cara"]}
    assert clm["certificates"].privileges == ("SELECT",) and not clm["certificates"].update_columns
    assert "INSERT" not in cara["requests"].privileges and "UPDATE" not in cara["requests"].privileges
    assert not {"sign_request", "profile", "csr_sha256", "requester"} & set(cara["requests"].update_columns)
    # A stored certificate is never changed, by anyone: CARA inserts it with its commit order (hapki.runtime.db.at_fence).
    assert "UPDATE" not in cara["certificates"].privileges and not cara["certificates"].update_columns


def test_sql_renders_per_account() -> None:
    sql = grant_sql("hapki", {"hapki_clm": ["'hapki_clm'@'%'"]})
    assert "GRANT SELECT, INSERT, UPDATE (revoked, expiry_check_at) ON `hapki`.`requests` TO 'hapki_clm'@'%'" in sql
    assert sql[1].startswith("REVOKE ALL PRIVILEGES")
    scripts = migration_sql("hapki", {1, 2})
    assert len(scripts) == 1 + len(available()) - 2

