"""Inventory rules without a database: cursors, states, the search's conditions, renewal name checks."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from hapki.clm import inventory
from hapki.clm.config import ClmConfig
from hapki.clm.inventory_store import search_statement
from hapki.contracts.errors import ErrorCode, InvalidCursor, NamesMismatch
from hapki.contracts.models import CertificateState, SearchCertificates, SignCertificate

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ID = "0123456789abcdef0123456789abcdef"


def _cursor_json(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_cursor_round_trips_to_the_microsecond() -> None:
    position = inventory.Position(datetime(2027, 2, 24, 8, 30, 1, 123456, tzinfo=UTC), ID)
    cursor = inventory.encode_cursor(position)
    assert inventory.decode_cursor(cursor) == position
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor


@pytest.mark.parametrize("cursor", [
    "garbage!!", "", "e30", _cursor_json([1, 2]), _cursor_json({"v": 2, "a": "2027-01-01T00:00:00+00:00", "i": ID}),
    _cursor_json({"v": 1, "a": "2027-01-01T00:00:00", "i": ID}),  # naive time
    _cursor_json({"v": 1, "a": "yesterday", "i": ID}),
    _cursor_json({"v": 1, "a": "2027-01-01T00:00:00+00:00", "i": "XYZ"}),
    _cursor_json({"v": 1, "a": "2027-01-01T00:00:00+00:00", "i": 7}),
    _cursor_json({"v": 1, "a": "2027-01-01T00:00:00+00:00", "i": ID, "x": 1}),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
])
def test_a_cursor_this_service_did_not_make_is_refused_with_its_code(cursor: str) -> None:
    with pytest.raises(InvalidCursor) as caught:
        inventory.decode_cursor(cursor)
    assert caught.value.code is ErrorCode.INVALID_CURSOR and caught.value.details["field"] == "cursor"


def test_state_revoked_wins_over_expired() -> None:
    assert inventory.state(NOW + timedelta(seconds=1), False, NOW) is CertificateState.VALID
    assert inventory.state(NOW, False, NOW) is CertificateState.EXPIRED
    assert inventory.state(NOW - timedelta(days=1), True, NOW) is CertificateState.REVOKED
    assert inventory.state(NOW + timedelta(days=1), True, NOW) is CertificateState.REVOKED


def test_every_filter_becomes_a_condition_with_its_argument() -> None:
    query = SearchCertificates(serial="ab12", subject="www.example.com", san="2001:DB8:0::1", requester="alice",
                               profile="tls-server", status="valid", expiring_before=NOW + timedelta(days=7), limit=5)
    after = inventory.Position(NOW, ID)
    statement, args = search_statement(query, after, NOW)
    naive = NOW.replace(tzinfo=None)
    assert args == ("ab12", "www.example.com", "2001:db8::1", "alice", "tls-server", naive,
                    naive + timedelta(days=7), naive, naive, ID, 6)
    assert statement.count("%s") == len(args)
    assert "ORDER BY r.not_after, r.id LIMIT %s" in statement
    assert "n.kind = 'cn'" in statement and "n.kind IN ('dns', 'ip', 'email')" in statement


@pytest.mark.parametrize(("status", "condition"), [
    ("valid", "r.revoked = 0 AND r.not_after > %s"),
    ("expired", "r.revoked = 0 AND r.not_after <= %s"),
    ("revoked", "r.revoked = 1"),
])
def test_status_conditions(status: str, condition: str) -> None:
    conditions = inventory.search_conditions(SearchCertificates(status=status), None, NOW)
    assert conditions.sql == ["r.not_after IS NOT NULL", condition]


def test_no_filter_lists_issued_certificates_only() -> None:
    statement, args = search_statement(SearchCertificates(), None, NOW)
    assert "WHERE r.not_after IS NOT NULL ORDER BY" in statement and args == (101,)


@pytest.mark.parametrize("payload", [
    {"limit": 0}, {"limit": 501}, {"limit": "many"}, {"expiring_before": "2027-01-01T00:00:00"},
    {"expiring_before": "soon"}, {"status": "pending"}, {"serial": "XYZ"}, {"san": "a b"}, {"san": ""},
    {"owner": "me"}, {"cursor": ""},
])
def test_bad_queries_are_refused_by_the_contract(payload: dict) -> None:
    with pytest.raises(ValidationError):
        SearchCertificates.model_validate(payload)


def _approved(cn: str | None, dns: list[str], ips: list[str] = (), emails: list[str] = ()) -> SignCertificate:
    return SignCertificate(request_id=ID, profile="tls-server", csr_pem="x", common_name=cn, dns_names=dns,
                           ip_addresses=list(ips), emails=list(emails), validity_seconds=86400,
                           key_usage=["digital_signature"], extended_key_usage=["server_auth"])


def test_renewal_names_must_be_exactly_the_predecessors() -> None:
    before = _approved("a.example.com", ["a.example.com", "b.example.com"], ["10.0.0.1"])
    inventory.require_same_names(before, _approved("a.example.com", ["b.example.com", "A.example.com"], ["10.0.0.1"]))
    with pytest.raises(NamesMismatch) as caught:
        inventory.require_same_names(before, _approved("a.example.com", ["a.example.com", "c.example.com"]))
    assert caught.value.details["missing"] == ["dns:b.example.com", "ip:10.0.0.1"]
    assert caught.value.details["extra"] == ["dns:c.example.com"]
    with pytest.raises(NamesMismatch):  # the same SANs without the CN is another subject
        inventory.require_same_names(before, _approved(None, ["a.example.com", "b.example.com"], ["10.0.0.1"]))


def test_names_of_lists_cn_and_every_san_kind() -> None:
    approved = _approved("a.example.com", ["a.example.com"], ["10.0.0.1"], ["ops@example.com"])
    assert inventory.names_of(approved) == [("cn", "a.example.com"), ("dns", "a.example.com"), ("ip", "10.0.0.1"),
                                           ("email", "ops@example.com")]


def _config(**fields: object) -> ClmConfig:
    return ClmConfig.model_validate({"member": "clm-1", "nats": {"servers": ["nats://x:4222"]},
                                     "database": {"nodes": ["db:3306"], "user": "u", "database": "d"},
                                     "approval_key_file": "/etc/hapki/clm-approval.key", **fields})


def test_expiry_config_is_strict() -> None:
    assert _config().expiry_windows_seconds == [30 * 86400, 7 * 86400, 86400]
    assert _config(expiry_windows_seconds=[]).expiry_windows_seconds == []
    for bad in ({"expiry_windows_seconds": [0]}, {"expiry_windows_seconds": [86400, 86400]},
                {"expiry_windows_seconds": [399 * 86400]}, {"expiry_interval_seconds": 0}, {"expiry_batch": 0},
                {"expiry_window_days": 3}):
        with pytest.raises(ValidationError):
            _config(**bad)
