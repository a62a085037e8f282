"""hapki.runtime.invariants.new_rows: what a run or a test made, apart from what earlier runs left in the database."""

from __future__ import annotations

from hapki.runtime.invariants import CHECKS, new_rows


def test_only_rows_absent_before_are_new_and_every_invariant_is_named() -> None:
    left = ("a14eaad7", "req-1", "intent-1", 3, "abandoned", "a14eaad7", 3, "cara-1", "superseded")
    made = ("b20f", "req-2", "intent-2", 4, "reserved", "b20f", 4, "cara-2", None)
    before = {"certificate_without_issued_intent": [left], "pending_requests": [("req-9", "t")]}
    after = {name: [] for name in CHECKS} | {"certificate_without_issued_intent": [made, left]}
    found = new_rows(before, after)
    assert set(found) == set(CHECKS)
    assert found["certificate_without_issued_intent"] == [made]
    assert not any(rows for name, rows in found.items() if name != "certificate_without_issued_intent")


def test_a_row_whose_state_changed_counts_as_new() -> None:
    # A violating certificate whose intent moved from reserved to abandoned is found again: the run touched it.
    before = {"certificate_without_issued_intent": [("s", "r", "i", 1, "reserved", "s", 1, "m", None)]}
    after = {"certificate_without_issued_intent": [("s", "r", "i", 1, "abandoned", "s", 1, "m", "superseded")]}
    assert len(new_rows(before, after)["certificate_without_issued_intent"]) == 1


def test_rows_read_as_lists_compare_as_tuples() -> None:
    before = {"duplicate_serials": [["issuer", "01", 2]]}
    after = {"duplicate_serials": [("issuer", "01", 2)]}
    assert new_rows(before, after) == {"duplicate_serials": []}
