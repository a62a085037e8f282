"""Appending audit entries: one round trip for many entries and the caller's statements ahead (a fake cursor)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from hapki.runtime.audit import AuditKind, AuditRecord, append, append_many

T0 = datetime(2026, 11, 26, 6, 0, 0, 123456)


class FakeCursor:
    """Records each execute; reports a row count per statement of the last one, in order, through nextset()."""

    def __init__(self, counts: list[int]) -> None:
        self.executed: list[tuple[str, tuple[object, ...]]] = []
        self._counts, self._at = counts, 0
        self.rowcount = -1

    async def execute(self, sql: str, args: tuple[object, ...]) -> None:
        self.executed.append((sql, args))
        self._at = 0
        self.rowcount = self._counts[0]

    async def nextset(self) -> bool:
        self._at += 1
        self.rowcount = self._counts[self._at]
        return True

    async def fetchall(self) -> list[tuple]:
        return []  # what a real cursor gives for a statement without a result set


def _record(i: int) -> AuditRecord:
    return AuditRecord(kind=AuditKind.CERTIFICATE_ISSUED, actor="cara:cara-1", created_at=T0, epoch=2,
                       request_id=f"{i:032x}", serial=f"{i:x}", detail={"n": i}, id=f"{i:032x}")


async def test_many_entries_and_leading_statements_go_in_one_round_trip() -> None:
    cur = FakeCursor([1, 1, 3, 3])
    records = [_record(i) for i in range(1, 4)]
    counts = await append_many(cur, records, first=[("UPDATE a SET x = %s WHERE id = %s", (1, "a")),
                                                     ("UPDATE b SET y = %s", (2,))])
    [(sql, args)] = cur.executed
    statements = sql.split("; ")
    assert statements[:2] == ["UPDATE a SET x = %s WHERE id = %s", "UPDATE b SET y = %s"]
    assert statements[2].startswith("INSERT INTO audit_entries") and statements[2].count("(%s, %s, %s") == 3
    assert statements[3] == "INSERT INTO audit_unsealed (entry_id, created_at, entry_ids) VALUES (%s, %s, %s)"
    assert sql.count("%s") == len(args)
    assert args[:3] == (1, "a", 2) and args[3] == records[0].id
    # One marker for the three: keyed by the first entry, ordered by the oldest, listing all of them.
    assert args[-3:] == (records[0].id, T0, ",".join(r.id for r in records))
    assert counts == [1, 1, 3]  # the leading statements, then the entries' insert


async def test_the_marker_is_ordered_by_the_oldest_entry_and_a_single_entry_lists_none() -> None:
    cur = FakeCursor([3, 1])
    older = AuditRecord(kind=AuditKind.REQUEST_RECORDED, actor="clm", created_at=T0 - timedelta(seconds=1), id="f" * 32)
    records = [_record(1), older, _record(2)]
    await append_many(cur, records)
    [(_, args)] = cur.executed
    assert args[-3:] == (records[0].id, older.created_at, f"{records[0].id},{'f' * 32},{records[2].id}")
    cur = FakeCursor([1, 1])
    await append(cur, _record(5))
    [(_, args)] = cur.executed
    assert args[-3:] == (_record(5).id, T0, None)  # the form of every marker before migration 0007


async def test_append_is_one_entry_and_returns_the_count_of_its_statement_ahead() -> None:
    cur = FakeCursor([0, 1, 1])
    assert await append(cur, _record(7), first=("UPDATE r SET s = %s", ("x",))) == 0
    cur = FakeCursor([1, 1])
    assert await append(cur, _record(8)) == 1
    assert len(cur.executed) == 1


async def test_commit_goes_in_the_same_round_trip_and_counts_only_the_callers_statements() -> None:
    cur = FakeCursor([1, 1, 1, 0])
    assert await append_many(cur, [_record(9)], first=[("INSERT INTO r VALUES (%s)", ("x",))], commit=True) == [1, 1]
    [(sql, _)] = cur.executed
    assert sql.split("; ")[-1] == "COMMIT" and sql.count("; ") == 3


async def test_nothing_to_append_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        await append_many(FakeCursor([0]), [])
