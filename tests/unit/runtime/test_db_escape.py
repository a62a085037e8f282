"""hapki.runtime.db's repairs of the MySQL driver's escaping: the same SQL literals as PyMySQL's, and bytes that work."""

from __future__ import annotations

import aiomysql.connection
import pymysql.converters
from hypothesis import given
from hypothesis import strategies as st

from hapki.runtime import db

# The characters PyMySQL escapes, mixed with anything else: most generated strings hit several of them.
SPECIAL = "\\\0\n\r\032\"'"


@given(st.text(alphabet=st.one_of(st.sampled_from(SPECIAL), st.characters()), max_size=300))
def test_strings_escape_exactly_as_pymysql_escapes_them(value: str) -> None:
    assert db.escape_string(value) == pymysql.converters.escape_string(value)


def test_a_backslash_before_a_special_character_is_escaped_once_each() -> None:
    assert db.escape_string("\\'") == "\\\\\\'"
    assert db.escape_string("a\\nb\n") == "a\\\\nb\\n"


def test_the_driver_escapes_through_the_repairs() -> None:
    assert aiomysql.connection.escape_string is db.escape_string
    assert callable(aiomysql.connection.escape_bytes_prefixed)
    assert aiomysql.connection.escape_bytes_prefixed(b"\x00'\xff") == "_binary X'0027ff'"
