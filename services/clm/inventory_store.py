"""MariaDB adapter of CLM's InventoryStore: search pages, renewal look-ups and the expiry notices outbox.

Reads `requests` (with issuer, not_after and revoked kept there, see migration 0004), `request_names`,
`certificates` (not_before only) and `revocations`; writes only `expiry_notices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import aiomysql

from hapki.clm import inventory
from hapki.clm.ports import ExpiryBatch, ExpiryNotice, Predecessor
from hapki.contracts.errors import NotFound
from hapki.contracts.models import (
    CertificateExpiring,
    CertificateSummary,
    RevocationReason,
    SearchCertificates,
    SearchReply,
    SignCertificate,
)
from hapki.runtime.db import Database, db_time, utc

_SEARCH = (
    "SELECT r.id, r.serial, r.issuer, r.requester, r.profile, r.not_after, r.revoked, r.renews_serial,"
    " r.sign_request, c.not_before, v.revoked_at, v.reason"
    " FROM requests r"
    " LEFT JOIN certificates c ON c.request_id = r.id"
    " LEFT JOIN revocations v ON v.issuer = r.issuer AND v.serial = r.serial"
    " WHERE {where} ORDER BY r.not_after, r.id LIMIT %s"
)

# What the expiry scheduler needs of a certificate. `renewed`: an issued successor exists.
_EXPIRY_COLUMNS = (
    "SELECT r.id, r.issuer, r.serial, r.requester, r.profile, r.not_after, r.revoked,"
    " JSON_VALUE(r.sign_request, '$.common_name'),"
    " EXISTS (SELECT 1 FROM requests s WHERE s.renews_serial = r.serial AND s.status = 'issued')"
    " FROM requests r"
)
# Certificates the scheduler has not looked at yet, and those whose next window opens by now: index ranges on
# (expiry_check_at, not_after); a run reads what needs work, not every certificate inside a window.
UNSEEN_FOR_EXPIRY = _EXPIRY_COLUMNS + " WHERE r.expiry_check_at IS NULL AND r.not_after IS NOT NULL LIMIT %s"
DUE_FOR_EXPIRY = _EXPIRY_COLUMNS + " WHERE r.expiry_check_at <= %s ORDER BY r.expiry_check_at LIMIT %s"


def search_statement(query: SearchCertificates, after: inventory.Position | None,
                     now: datetime) -> tuple[str, tuple[object, ...]]:
    """The SELECT of one search page (limit + 1 rows: the extra one says whether there is a next page)."""
    conditions = inventory.search_conditions(query, after, now)
    return _SEARCH.format(where=" AND ".join(conditions.sql)), (*conditions.args, query.limit + 1)


class MariaDBInventoryStore:
    """InventoryStore on MariaDB/Galera."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def search(self, query: SearchCertificates, now: datetime) -> SearchReply:
        after = inventory.decode_cursor(query.cursor) if query.cursor is not None else None
        statement, args = search_statement(query, after, now)

        async def body(cur: aiomysql.Cursor) -> list[tuple]:
            await cur.execute(statement, args)
            return list(await cur.fetchall())

        rows = await self._db.run(body, name="clm.search")
        items = [_summary(row, now) for row in rows[: query.limit]]
        next_cursor = None
        if len(rows) > query.limit:
            last = items[-1]
            next_cursor = inventory.encode_cursor(inventory.Position(last.not_after, last.request_id))
        return SearchReply(items=items, next_cursor=next_cursor)

    async def predecessor(self, serial: str) -> Predecessor:
        async def body(cur: aiomysql.Cursor) -> Predecessor:
            await cur.execute(
                "SELECT r.id, r.requester, r.profile, r.revoked, r.sign_request"
                f" FROM {inventory.CERTIFICATE_BY_SERIAL} JOIN requests r ON r.id = c.request_id"
                " WHERE r.status = 'issued'",
                (serial,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}", {"field": "serial", "serial": serial})
            return Predecessor(serial=serial, request_id=row[0], requester=row[1], profile=row[2],
                               revoked=bool(row[3]), approved=SignCertificate.model_validate_json(row[4]))

        return await self._db.run(body, name="clm.predecessor")

    async def record_expiring(self, windows_seconds: Sequence[int], now: datetime, limit: int) -> ExpiryBatch:
        """For up to `limit` unseen and `limit` due certificates: record a notice per window each is in, and set
        when to look again, in one transaction."""

        async def body(cur: aiomysql.Cursor) -> ExpiryBatch:
            await cur.execute(UNSEEN_FOR_EXPIRY, (limit,))
            unseen = await cur.fetchall()
            await cur.execute(DUE_FOR_EXPIRY, (db_time(now), limit))
            due = await cur.fetchall()
            notices, checks = [], []
            for request_id, issuer, serial, requester, profile, not_after, revoked, common_name, renewed in (
                    *unseen, *due):
                expires = utc(not_after)
                assert expires is not None
                plan = inventory.expiry_plan(expires, revoked=bool(revoked), renewed=bool(renewed),
                                             windows=windows_seconds, now=now)
                checks.append((db_time(plan.next_check), request_id))
                for window in plan.windows:
                    event = CertificateExpiring(
                        issuer=issuer, serial=serial, request_id=request_id, requester=requester, profile=profile,
                        common_name=common_name, not_after=expires, window_seconds=window, detected_at=now,
                    )
                    notices.append((issuer, serial, window, request_id, event.model_dump_json(), db_time(now)))
            recorded = 0
            if notices:
                # A row already there was recorded earlier (an earlier window's check, another scheduler in a split
                # brain or before a failover): it is the notice, left as it is (the no-op update counts 0 rows and,
                # unlike INSERT IGNORE, warns of nothing).
                await cur.executemany(
                    "INSERT INTO expiry_notices (issuer, serial, window_seconds, request_id, event, recorded_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE request_id = request_id",
                    notices,
                )
                recorded = max(cur.rowcount, 0)
            if checks:
                # One statement for the batch: executemany sent an UPDATE per certificate, 500 round trips that took
                # over the transaction bound on a busy host, so the batch never committed and every timeout moved the
                # whole CLM process to another database node (docs/PERFORMANCE-HISTORY.md, session 10).
                await cur.execute(
                    "UPDATE requests SET expiry_check_at = CASE id " + " ".join(["WHEN %s THEN %s"] * len(checks))
                    + f" END WHERE id IN ({', '.join(['%s'] * len(checks))})",
                    (*(value for next_check, request_id in checks for value in (request_id, next_check)),
                     *(request_id for _, request_id in checks)))
            return ExpiryBatch(examined=len(checks), recorded=recorded,
                               more=len(unseen) == limit or len(due) == limit)

        return await self._db.run(body, name="clm.expiry_record")

    async def unpublished_notices(self, limit: int) -> list[ExpiryNotice]:
        async def body(cur: aiomysql.Cursor) -> list[ExpiryNotice]:
            await cur.execute(
                "SELECT issuer, serial, window_seconds, event FROM expiry_notices WHERE published_at IS NULL"
                " ORDER BY recorded_at LIMIT %s",
                (limit,),
            )
            return [ExpiryNotice(issuer=r[0], serial=r[1], window_seconds=r[2], event_json=r[3])
                    for r in await cur.fetchall()]

        return await self._db.run(body, name="clm.expiry_unpublished")

    async def mark_published(self, notices: list[ExpiryNotice], now: datetime) -> None:
        if not notices:
            return

        async def body(cur: aiomysql.Cursor) -> None:
            # One statement (a range on the primary key), not one per notice (see record_expiring).
            await cur.execute(
                "UPDATE expiry_notices SET published_at = %s WHERE (issuer, serial, window_seconds) IN ("
                + ", ".join(["(%s, %s, %s)"] * len(notices)) + ") AND published_at IS NULL",
                (db_time(now), *(value for n in notices for value in (n.issuer, n.serial, n.window_seconds))),
            )

        await self._db.run(body, name="clm.expiry_published")


def _summary(row: tuple, now: datetime) -> CertificateSummary:
    (request_id, serial, issuer, requester, profile, not_after, revoked, renews_serial, sign_request, not_before,
     revoked_at, reason) = row
    approved = SignCertificate.model_validate_json(sign_request)
    expires = utc(not_after)
    assert expires is not None  # the search's first condition
    return CertificateSummary(
        serial=serial, issuer=issuer, request_id=request_id, requester=requester, profile=profile,
        status=inventory.state(expires, bool(revoked), now), common_name=approved.common_name,
        dns_names=approved.dns_names, ip_addresses=approved.ip_addresses, emails=approved.emails,
        not_before=utc(not_before), not_after=expires, revoked_at=utc(revoked_at),
        revocation_reason=RevocationReason(reason) if reason is not None else None, renews_serial=renews_serial,
    )
