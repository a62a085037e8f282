"""The audit chain's encoding, hash and verification, on chains built in memory (no database)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.runtime.audit import (
    GENESIS,
    AuditKind,
    AuditRecord,
    canonical,
    checkpoint_message,
    derived_id,
    link_hash,
    record_from_row,
)
from hapki.runtime.audit_verify import ChainLink, Checkpoint, Problem, verify

T0 = datetime(2026, 11, 26, 6, 0, 0, 123456)  # naive UTC, as read back from DATETIME(6)


def _record(i: int) -> AuditRecord:
    return AuditRecord(kind=AuditKind.CERTIFICATE_ISSUED, actor="cara:cara-1", created_at=T0 + timedelta(seconds=i),
                       epoch=3, request_id=f"{i:032x}", issuer="issuing-1", serial=f"{i:040x}",
                       detail={"n": i, "name": f"host{i}.example.com"}, id=f"{i + 1000:032x}")


def _chain(n: int) -> list[ChainLink]:
    links, prev = [], GENESIS
    for seq in range(1, n + 1):
        record = _record(seq)
        digest = link_hash(prev, record, seq)
        links.append(ChainLink(seq, record.id, prev, digest, record, record.detail_json()))
        prev = digest
    return links


def _head(links: list[ChainLink]) -> tuple[int, str]:
    return links[-1].seq, links[-1].hash


def _problems(links: list[ChainLink], head: tuple[int, str] | None) -> list[tuple[int, Problem]]:
    return [(f.seq, f.problem) for f in verify(links, head).findings]


def test_the_hash_is_sha256_of_the_previous_hash_and_the_canonical_entry() -> None:
    record = _record(1)
    expected = hashlib.sha256(bytes(32) + canonical(record, 1)).hexdigest()
    assert link_hash(GENESIS, record, 1) == expected
    assert canonical(record, 1) != canonical(record, 2), "the position is part of what is hashed"


def test_canonical_encoding_is_stable_and_independent_of_key_order_and_timezone() -> None:
    record = _record(1)
    shuffled = dataclasses.replace(record, detail={"name": "host1.example.com", "n": 1},
                                   created_at=record.created_at.replace(tzinfo=UTC))
    assert canonical(record, 1) == canonical(shuffled, 1)
    assert canonical(record, 1) == (
        b'{"actor":"cara:cara-1","created_at":"2026-11-26T06:00:01.123456Z",'
        b'"detail":"{\\"n\\":1,\\"name\\":\\"host1.example.com\\"}","epoch":3,"id":"000000000000000000000000000003e9",'
        b'"issuer":"issuing-1","kind":"certificate.issued","request_id":"00000000000000000000000000000001",'
        b'"seq":1,"serial":"0000000000000000000000000000000000000001"}')


def test_every_field_is_covered() -> None:
    record = _record(1)
    base = link_hash(GENESIS, record, 1)
    for change in ({"kind": AuditKind.CERTIFICATE_REVOKED}, {"actor": "x"}, {"epoch": 4}, {"request_id": None},
                   {"issuer": "other"}, {"serial": "ff"}, {"detail": {"n": 2}}, {"id": "0" * 32},
                   {"created_at": T0 + timedelta(microseconds=1)}):
        assert link_hash(GENESIS, dataclasses.replace(record, **change), 1) != base, change


def test_derived_ids_are_deterministic_and_distinct() -> None:
    assert derived_id("a", 1) == derived_id("a", "1")
    assert derived_id("a", "b") != derived_id("ab", "")
    assert len(derived_id("x")) == 32


def test_an_intact_chain_verifies() -> None:
    links = _chain(6)
    report = verify(links, _head(links))
    assert report.ok and report.sealed == 6 and report.head_seq == 6, report.findings
    assert verify([], None).ok, "an empty log is intact"
    assert verify(list(reversed(links)), _head(links)).ok, "the order links are read in does not matter"


def test_an_altered_entry_is_named() -> None:
    links = _chain(6)
    links[2] = dataclasses.replace(links[2], entry=dataclasses.replace(links[2].entry, serial="dead"))
    assert _problems(links, _head(links)) == [(3, Problem.ALTERED)]


def test_an_altered_detail_is_named() -> None:
    links = _chain(6)
    links[3] = dataclasses.replace(links[3], detail='{"n":4,"name":"evil.example.com"}')
    assert _problems(links, _head(links)) == [(4, Problem.ALTERED)]


def test_a_recomputed_hash_breaks_the_next_link() -> None:
    links = _chain(6)
    forged = dataclasses.replace(links[2].entry, serial="dead")
    links[2] = dataclasses.replace(links[2], entry=forged, detail=forged.detail_json(),
                                   hash=link_hash(links[2].prev_hash, forged, 3))
    assert _problems(links, _head(links))[0][0] == 4


def test_a_removed_middle_entry_is_named() -> None:
    links = _chain(6)
    del links[2]  # entry and its link gone
    assert _problems(links, _head(links)) == [(3, Problem.REMOVED)]


def test_a_removed_entry_row_behind_its_link_is_named() -> None:
    links = _chain(6)
    links[2] = dataclasses.replace(links[2], entry=None, detail=None)
    assert _problems(links, _head(links)) == [(3, Problem.REMOVED)]


def test_a_removed_entry_with_the_rest_renumbered_is_named() -> None:
    links = _chain(6)
    shifted = [dataclasses.replace(link, seq=link.seq - 1) for link in links[3:]]
    links = links[:2] + shifted
    assert _problems(links, _head(links))[0] == (3, Problem.REMOVED)


def test_two_swapped_entries_are_named_reordered() -> None:
    links = _chain(6)
    a, b = links[1], links[4]
    links[1] = dataclasses.replace(a, entry_id=b.entry_id, entry=b.entry, detail=b.detail)
    links[4] = dataclasses.replace(b, entry_id=a.entry_id, entry=a.entry, detail=a.detail)
    assert _problems(links, _head(links)) == [(2, Problem.REORDERED), (5, Problem.REORDERED)]


def test_two_swapped_links_are_named_reordered() -> None:
    links = _chain(6)
    links[2], links[3] = dataclasses.replace(links[3], seq=3), dataclasses.replace(links[2], seq=4)
    findings = verify(links, _head(links)).findings
    assert [(f.seq, f.problem) for f in findings] == [(3, Problem.REORDERED), (4, Problem.REORDERED)]
    assert "was chained at seq 4" in findings[0].message


def test_a_removed_newest_entry_is_named_truncated() -> None:
    links = _chain(6)
    head = _head(links)
    assert _problems(links[:-1], head) == [(6, Problem.TRUNCATED)]
    assert _problems(links[:-2], head) == [(5, Problem.TRUNCATED)]
    assert _problems([], head) == [(1, Problem.TRUNCATED)]


def test_a_removed_head_is_named() -> None:
    links = _chain(3)
    assert _problems(links, None) == [(3, Problem.TRUNCATED)]


def test_links_beyond_the_head_or_a_wrong_head_hash_are_named() -> None:
    links = _chain(4)
    assert _problems(links, (3, links[2].hash)) == [(4, Problem.HEAD_MISMATCH)]
    assert _problems(links, (4, "f" * 64)) == [(4, Problem.HEAD_MISMATCH)]


def test_an_anchor_catches_a_rewritten_or_truncated_chain() -> None:
    links = _chain(5)
    anchor = _head(links)
    assert verify(links, _head(links), anchor=anchor).ok
    # Truncated to 4, head rewritten to match: consistent, except with the head recorded elsewhere.
    truncated = links[:4]
    assert verify(truncated, _head(truncated)).ok
    assert [f.problem for f in verify(truncated, _head(truncated), anchor=anchor).findings] == [
        Problem.ANCHOR_MISMATCH]


def test_entries_left_unchained_past_the_grace_are_named() -> None:
    links = _chain(2)
    now = T0 + timedelta(minutes=10)
    fresh = [("a" * 32, now - timedelta(seconds=1))]
    stale = [("b" * 32, now - timedelta(minutes=5))]
    assert verify(links, _head(links), unsealed=fresh, now=now).ok
    report = verify(links, _head(links), unsealed=stale, now=now)
    assert [(f.seq, f.problem, f.entry_id) for f in report.findings] == [(3, Problem.UNSEALED, "b" * 32)]


def test_the_summary_names_the_first_break() -> None:
    links = _chain(6)
    links[4] = dataclasses.replace(links[4], entry=dataclasses.replace(links[4].entry, actor="mallory"))
    del links[1]
    summary = verify(links, _head(links)).summary()
    assert summary.startswith("audit chain broken at seq 2: removed"), summary
    assert "1 more" in summary


@pytest.mark.parametrize("n", [1, 50])
def test_any_single_altered_field_anywhere_is_caught(n: int) -> None:
    links = _chain(n)
    for i in range(n):
        tampered = list(links)
        tampered[i] = dataclasses.replace(links[i], entry=dataclasses.replace(links[i].entry, epoch=99))
        assert _problems(tampered, _head(links)) == [(i + 1, Problem.ALTERED)]


# --- signed checkpoints ----------------------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())


def _checkpoint(link: ChainLink, key: ec.EllipticCurvePrivateKey = _KEY) -> Checkpoint:
    signed_at = T0 + timedelta(minutes=1)
    signature = key.sign(checkpoint_message(link.seq, link.hash, signed_at, "issuing-1"), ec.ECDSA(hashes.SHA256()))
    return Checkpoint(seq=link.seq, hash=link.hash, signed_at=signed_at, issuer="issuing-1", key_id="k1",
                      signature=signature)


def _recomputed(links: list[ChainLink], index: int, **change: object) -> list[ChainLink]:
    """What someone with write access but no HSM can do: alter an entry and recompute every later hash."""
    out, prev = list(links[:index]), links[index - 1].hash if index else GENESIS
    for i, link in enumerate(links[index:], start=index):
        entry = dataclasses.replace(link.entry, **change) if i == index else link.entry
        digest = link_hash(prev, entry, link.seq)
        out.append(ChainLink(link.seq, entry.id, prev, digest, entry, entry.detail_json()))
        prev = digest
    return out


def test_a_valid_checkpoint_covers_the_chain_up_to_it() -> None:
    links = _chain(5)
    report = verify(links, _head(links), checkpoints=[_checkpoint(links[2]), _checkpoint(links[4])],
                    keys={"k1": _KEY.public_key()})
    assert report.ok and report.signed_seq == 5, report.findings
    assert "signed up to seq 5" in report.summary()


def test_a_recomputed_chain_passes_without_a_checkpoint_and_fails_with_one() -> None:
    links = _chain(6)
    forged = _recomputed(links, 2, actor="mallory")
    assert verify(forged, _head(forged)).ok, "a plain hash chain cannot stop someone who recomputes it"
    report = verify(forged, _head(forged), checkpoints=[_checkpoint(links[4])], keys={"k1": _KEY.public_key()})
    assert [(f.seq, f.problem) for f in report.findings] == [(5, Problem.CHECKPOINT_MISMATCH)]


def test_a_cut_below_a_checkpoint_is_truncation_even_with_a_consistent_head() -> None:
    links = _chain(6)
    cut = links[:4]
    report = verify(cut, _head(cut), checkpoints=[_checkpoint(links[5])], keys={"k1": _KEY.public_key()})
    assert [(f.seq, f.problem) for f in report.findings] == [(5, Problem.TRUNCATED)]


def test_a_checkpoint_signed_by_another_key_or_tampered_is_invalid() -> None:
    links = _chain(3)
    keys = {"k1": _KEY.public_key()}
    other = _checkpoint(links[2], ec.generate_private_key(ec.SECP256R1()))
    moved = dataclasses.replace(_checkpoint(links[1]), seq=3, hash=links[2].hash)
    unknown = dataclasses.replace(_checkpoint(links[2]), key_id="k2")
    for bad in (other, moved, unknown):
        report = verify(links, _head(links), checkpoints=[bad], keys=keys)
        assert [(f.seq, f.problem) for f in report.findings] == [(3, Problem.CHECKPOINT_INVALID)], bad


def test_garbage_in_the_tables_is_a_finding_not_a_crash() -> None:
    links = _chain(4)
    links[1] = dataclasses.replace(links[1], prev_hash="not hex")
    links[2] = dataclasses.replace(links[2], detail="{not json")
    assert [p for _, p in _problems(links, _head(links))] == [Problem.ALTERED, Problem.ALTERED]
    row = (links[3].entry.id, "certificate.issued", "a", 1, None, None, None, "[1, 2", T0)
    assert record_from_row(row).detail == {"unparseable": "[1, 2"}
