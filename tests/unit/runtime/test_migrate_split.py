"""Splitting a migration file into statements: comment lines dropped, semicolons inside quotes kept."""

from __future__ import annotations

from hapki.runtime.migrate import available, split_statements


def test_a_semicolon_inside_a_quoted_text_does_not_end_the_statement() -> None:
    sql = (
        "-- a comment; with a semicolon and a quote ' in it\n"
        "ALTER TABLE t ADD COLUMN c TEXT NULL COMMENT 'a list; or NULL';\n"
        "CREATE INDEX ix ON t (c);\n"
        "INSERT INTO t VALUES ('it\\'s; fine', \"x;y\");\n"
    )
    assert split_statements(sql) == [
        "ALTER TABLE t ADD COLUMN c TEXT NULL COMMENT 'a list; or NULL'",
        "CREATE INDEX ix ON t (c)",
        "INSERT INTO t VALUES ('it\\'s; fine', \"x;y\")",
    ]


def test_every_shipped_migration_splits_into_statements_with_balanced_quotes() -> None:
    for version, name, sql in available():
        statements = split_statements(sql)
        assert statements, f"{version:04d}_{name} has no statement"
        for statement in statements:
            assert statement.count("'") % 2 == 0, f"{version:04d}_{name}: a quote left open in {statement[:80]!r}"
