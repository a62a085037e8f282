"""Inventory rules, pure: search cursors, certificate states, the search's SQL conditions and renewal name checks.

No I/O and no clock: `now` is passed in. The MariaDB adapter (inventory_store.py) runs what this builds.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from dataclasses import dataclass
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from hapki.contracts.errors import InvalidCursor, NamesMismatch
from hapki.contracts.models import CertificateState, SearchCertificates, SignCertificate

CURSOR_VERSION = 1
# expiry_check_at of a certificate the expiry scheduler is done with (revoked, renewed, expired, past every window).
NEVER = datetime(9999, 12, 31, tzinfo=UTC)
# The request_names kinds that are subjectAltNames (the CN is kind "cn").
SAN_KINDS = ("dns", "ip", "email")


@dataclass(frozen=True)
class Position:
    """A place in the search order (not_after, request id): the last item of a page."""

    not_after: datetime  # aware, UTC
    request_id: str


def encode_cursor(position: Position) -> str:
    """The opaque next_cursor for a position: base64url of a small JSON object, unpadded."""
    raw = json.dumps({"v": CURSOR_VERSION, "a": position.not_after.astimezone(UTC).isoformat(),
                      "i": position.request_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names, or InvalidCursor when this service did not make it."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != {"v", "a", "i"} or data["v"] != CURSOR_VERSION:
            raise ValueError("not a cursor of this version")
        not_after = datetime.fromisoformat(data["a"])
        request_id = data["i"]
        if not_after.tzinfo is None or not isinstance(request_id, str) or len(request_id) != 32 or any(
                c not in "0123456789abcdef" for c in request_id):
            raise ValueError("bad position")
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise InvalidCursor("cursor is not one this service returned: start again without a cursor",
                            {"field": "cursor", "reason": str(exc)[:120]}) from None
    return Position(not_after=not_after.astimezone(UTC), request_id=request_id)


def state(not_after: datetime, revoked: bool, now: datetime) -> CertificateState:
    """A certificate's state at `now`: revoked wins over expired."""
    if revoked:
        return CertificateState.REVOKED
    return CertificateState.VALID if not_after > now else CertificateState.EXPIRED


def normalize_search_name(value: str) -> str:
    """A searched name in the form validation stores: IP addresses canonical; the rest compares case-insensitively."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


@dataclass(frozen=True)
class Conditions:
    """SQL conditions on `requests r` (joined by AND) with their arguments, in order. Times are naive UTC."""

    sql: list[str]
    args: list[object]


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


# A certificate by its serial alone: through the primary key (issuer, serial), once per issuer (a handful). Serials
# have no index of their own: they are random, so each such index cost every issuance a random page (0006).
CERTIFICATE_BY_SERIAL = "issuers i JOIN certificates c ON c.issuer = i.name AND c.serial = %s"


def search_conditions(query: SearchCertificates, after: Position | None, now: datetime) -> Conditions:
    """The WHERE conditions of a search. Every filter is an equality or a range on an index ending in (not_after,
    id), or a semi-join from request_names by value, so a page reads about `limit` index entries."""
    sql: list[str] = ["r.not_after IS NOT NULL"]  # set by CARA when issued: pending and failed requests drop out
    args: list[object] = []
    if query.serial is not None:
        sql.append(f"r.id IN (SELECT c.request_id FROM {CERTIFICATE_BY_SERIAL})")
        args.append(query.serial)
    if query.subject is not None:
        sql.append("r.id IN (SELECT n.request_id FROM request_names n WHERE n.value = %s AND n.kind = 'cn')")
        args.append(normalize_search_name(query.subject))
    if query.san is not None:
        kinds = ", ".join(f"'{kind}'" for kind in SAN_KINDS)
        sql.append(f"r.id IN (SELECT n.request_id FROM request_names n WHERE n.value = %s AND n.kind IN ({kinds}))")
        args.append(normalize_search_name(query.san))
    if query.requester is not None:
        sql.append("r.requester = %s")
        args.append(query.requester)
    if query.profile is not None:
        sql.append("r.profile = %s")
        args.append(query.profile)
    if query.status is CertificateState.REVOKED:
        sql.append("r.revoked = 1")
    elif query.status is CertificateState.VALID:
        sql.append("r.revoked = 0 AND r.not_after > %s")
        args.append(_naive(now))
    elif query.status is CertificateState.EXPIRED:
        sql.append("r.revoked = 0 AND r.not_after <= %s")
        args.append(_naive(now))
    if query.expiring_before is not None:
        sql.append("r.not_after < %s")
        args.append(_naive(query.expiring_before))
    if after is not None:
        # Keyset: (not_after, id) > (a, i), written so the first conjunct is an index range start (MariaDB does
        # not turn a row comparison into a range).
        sql.append("r.not_after >= %s AND (r.not_after > %s OR r.id > %s)")
        args.extend([_naive(after.not_after), _naive(after.not_after), after.request_id])
    return Conditions(sql=sql, args=args)


def names_of(approved: SignCertificate) -> list[tuple[str, str]]:
    """(kind, value) of every name CLM approved for a request: the CN and each SAN, as request_names stores them."""
    names = [("cn", approved.common_name)] if approved.common_name else []
    names += [("dns", n) for n in approved.dns_names]
    names += [("ip", n) for n in approved.ip_addresses]
    names += [("email", n) for n in approved.emails]
    return names


def require_same_names(predecessor: SignCertificate, renewal: SignCertificate) -> None:
    """Refuse a renewal whose approved names (CN and SANs, as sets) differ from its predecessor's."""
    before = {(k, v.lower()) for k, v in names_of(predecessor)}
    after = {(k, v.lower()) for k, v in names_of(renewal)}
    if before != after:
        raise NamesMismatch(
            "a renewal must carry exactly the names of the certificate it renews",
            {"field": "csr_pem", "missing": [f"{k}:{v}" for k, v in sorted(before - after)],
             "extra": [f"{k}:{v}" for k, v in sorted(after - before)]},
        )


@dataclass(frozen=True)
class ExpiryPlan:
    """What the expiry scheduler does with one certificate now: a notice per window it is in, and when to look again."""

    windows: list[int]  # seconds, largest first; a notice already recorded for one is not recorded again
    next_check: datetime  # when the next window opens; NEVER when nothing more can be due


def expiry_plan(not_after: datetime, *, revoked: bool, renewed: bool, windows: Sequence[int],
                now: datetime) -> ExpiryPlan:
    """Windows (seconds before not_after) the certificate is in at `now`, and when its next one opens.

    Revoked, renewed (an issued successor exists) and expired certificates are done: all three are final.
    """
    if revoked or renewed or not_after <= now:
        return ExpiryPlan(windows=[], next_check=NEVER)
    opens = {w: not_after - timedelta(seconds=w) for w in windows}
    inside = sorted((w for w, at in opens.items() if at <= now), reverse=True)
    ahead = [at for at in opens.values() if at > now]
    return ExpiryPlan(windows=inside, next_check=min(ahead) if ahead else NEVER)
