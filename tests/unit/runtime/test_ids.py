"""Time-ordered row ids (hapki.runtime.ids): the contract's format, ordered by time, and unguessable."""

from __future__ import annotations

import re

from hapki.contracts.models import CertificateIssued
from hapki.runtime.ids import time_ordered_id


def test_an_id_is_32_hex_digits_and_fits_every_request_id_field() -> None:
    value = time_ordered_id()
    assert re.fullmatch(r"[0-9a-f]{32}", value)
    assert CertificateIssued.model_fields["request_id"].metadata  # the contract's pattern applies ...
    CertificateIssued(request_id=value, serial="0a", issuer="i", certificate_pem="c", chain_pem="p",
                      not_before="2026-01-01T00:00:00Z", not_after="2026-01-02T00:00:00Z")  # ... and accepts it


def test_ids_sort_by_time_so_inserts_land_at_the_end_of_the_index() -> None:
    earlier = [time_ordered_id(1_800_000_000.000 + i / 1000) for i in range(50)]
    assert earlier == sorted(earlier)
    assert time_ordered_id(1_800_000_000.001) > time_ordered_id(1_800_000_000.000)
    assert time_ordered_id(1_800_000_000.0)[:12] == f"{1_800_000_000_000:012x}"


def test_ids_in_the_same_millisecond_differ_in_their_80_random_bits() -> None:
    same = {time_ordered_id(1_800_000_000.0) for _ in range(10_000)}
    assert len(same) == 10_000
    assert len({value[12:] for value in same}) == 10_000
