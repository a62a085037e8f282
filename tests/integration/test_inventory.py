"""Inventory, expiry notices and renewal end to end on real NATS (JetStream), MariaDB and SoftHSM."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import aiomysql
import nats
import pytest
from nats.js.errors import NotFoundError

from hapki.cara.main import CaraRuntime
from hapki.cli.client import ClmClient
from hapki.clm.inventory import NEVER, Position
from hapki.clm.inventory_store import DUE_FOR_EXPIRY, UNSEEN_FOR_EXPIRY, search_statement
from hapki.clm.main import ClmRuntime
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode
from hapki.contracts.models import (
    CertificateExpiring,
    CertificateState,
    IssueCertificate,
    IssueReply,
    RenewCertificate,
    RevocationReason,
    RevokeCertificate,
    SearchCertificates,
    SearchReply,
    SignCertificate,
)
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.clock import utcnow
from helpers.csr import make_csr, make_key
from integration.conftest import connected_client, own_statements, query
from telemetry_fixture import memory_exporter

pytestmark = pytest.mark.integration

LISTEN = "127.0.0.1:0"
DAY = 86400
WINDOWS = [30 * DAY, 7 * DAY]


class ShiftedClock:
    """CLM's clock, moved forward by `offset` (CARA keeps the real one: certificates carry real times)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset


class Rig:
    def __init__(self, cara: CaraRuntime, clm: ClmRuntime, clock: ShiftedClock) -> None:
        self.cara, self.clm, self.clock = cara, clm, clock
        host, port = clm.http.addresses[0][:2]
        self.clm_url = f"http://{host}:{port}"


def _clm(env: LocalEnv, clock: ShiftedClock, member: str = "clm-1", **overrides: Any) -> ClmRuntime:
    settings = {"wait_seconds": 10.0, "expiry_windows_seconds": WINDOWS, "expiry_interval_seconds": 3600.0,
                **overrides}
    return ClmRuntime(stack.clm_config(env, member=member, **settings), clock=clock)


@pytest.fixture(scope="module")
async def rig(env: LocalEnv) -> AsyncIterator[Rig]:
    memory_exporter()
    clock = ShiftedClock()
    cara = CaraRuntime(stack.cara_config(env))
    clm = _clm(env, clock, http_listen=LISTEN)
    await cara.start()
    await clm.start()
    try:
        yield Rig(cara, clm, clock)
    finally:
        await clm.stop()
        await cara.stop()


@pytest.fixture
async def nats_client(env: LocalEnv, rig: Rig) -> AsyncIterator[ClmClient]:
    rig.clock.offset = timedelta(0)
    async with connected_client(env) as c:
        yield c
    rig.clock.offset = timedelta(0)


def _tag() -> str:
    return uuid.uuid4().hex[:10]


async def _issue(client: ClmClient, names: list[str], requester: str, profile: str = "tls-server",
                 cn: str | None = None) -> IssueReply:
    csr_pem, _ = make_csr(names, key=make_key("p256", fresh=True), cn=cn)
    reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile=profile, requester=requester,
                                                idempotency_key=uuid.uuid4().hex))
    assert reply.error is None and reply.serial, reply
    return reply


async def _search(client: ClmClient, **filters: Any) -> SearchReply:
    reply = await client.search(SearchCertificates(**filters))
    assert reply.error is None, reply.error
    return reply


def _serials(reply: SearchReply) -> list[str]:
    return [item.serial for item in reply.items]


async def _revoke(client: ClmClient, serial: str) -> None:
    reply = await client.revoke(RevokeCertificate(serial=serial, reason=RevocationReason.SUPERSEDED, requester="x"))
    assert reply.error is None, reply.error


# --- search ---

async def test_search_by_each_filter(nats_client, rig) -> None:
    tag, requester = _tag(), f"inv-{_tag()}"
    ip = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    a = await _issue(nats_client, [f"a-{tag}.example.com", ip], requester, cn=f"a-{tag}.example.com")
    b = await _issue(nats_client, [f"b-{tag}.example.com"], requester, cn=f"b-{tag}.example.com")
    c = await _issue(nats_client, [f"c-{tag}.example.com", f"ops-{tag}@example.com"], requester, profile="tls-client",
                     cn=f"c-{tag}.example.com")
    await _revoke(nats_client, b.serial)

    assert _serials(await _search(nats_client, serial=a.serial)) == [a.serial]
    assert _serials(await _search(nats_client, subject=f"A-{tag}.EXAMPLE.com")) == [a.serial]
    assert _serials(await _search(nats_client, san=f"b-{tag}.example.com")) == [b.serial]
    assert _serials(await _search(nats_client, san=ip)) == [a.serial]
    assert _serials(await _search(nats_client, san=f"ops-{tag}@example.com")) == [c.serial]
    assert _serials(await _search(nats_client, subject=ip)) == [], "an IP SAN is not a subject CN"
    assert _serials(await _search(nats_client, subject=f"ops-{tag}@example.com")) == []
    everything = await _search(nats_client, requester=requester)
    # Order: (not_after, request id). c (30 days) expires first.
    assert _serials(everything)[0] == c.serial and set(_serials(everything)) == {a.serial, b.serial, c.serial}
    keys = [(i.not_after, i.request_id) for i in everything.items]
    assert keys == sorted(keys) and everything.next_cursor is None
    assert _serials(await _search(nats_client, requester=requester, profile="tls-client")) == [c.serial]
    assert _serials(await _search(nats_client, requester=requester, status="revoked")) == [b.serial]
    assert set(_serials(await _search(nats_client, requester=requester, status="valid"))) == {a.serial, c.serial}
    assert _serials(await _search(nats_client, requester=requester, status="expired")) == []
    soon = utcnow() + timedelta(days=60)
    assert _serials(await _search(nats_client, requester=requester, expiring_before=soon)) == [c.serial]
    assert _serials(await _search(nats_client, requester=f"{requester}-nobody")) == []

    item = next(i for i in everything.items if i.serial == a.serial)
    assert (item.issuer, item.request_id, item.requester, item.profile, item.status) == (
        "issuing-1", a.request_id, requester, "tls-server", CertificateState.VALID)
    assert (item.common_name, item.dns_names, item.ip_addresses) == (f"a-{tag}.example.com",
                                                                     [f"a-{tag}.example.com"], [ip])
    assert (item.not_before, item.not_after) == (a.not_before, a.not_after)
    revoked = next(i for i in everything.items if i.serial == b.serial)
    assert revoked.status is CertificateState.REVOKED and revoked.revocation_reason is RevocationReason.SUPERSEDED
    assert revoked.revoked_at is not None

    rig.clock.offset = timedelta(days=91)  # all three past their not_after, as CLM sees it
    assert set(_serials(await _search(nats_client, requester=requester, status="expired"))) == {a.serial, c.serial}
    assert _serials(await _search(nats_client, requester=requester, status="valid")) == []
    assert _serials(await _search(nats_client, requester=requester, status="revoked")) == [b.serial]


async def test_paging_covers_every_certificate_once_in_order(nats_client) -> None:
    requester = f"page-{_tag()}"
    issued = await asyncio.gather(*(_issue(nats_client, [f"p{i}-{_tag()}.example.com"], requester)
                                    for i in range(7)))
    seen, cursor, pages = [], None, 0
    while True:
        page = await _search(nats_client, requester=requester, limit=3, cursor=cursor)
        pages += 1
        assert len(page.items) <= 3
        seen += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3 and [len(p) for p in (seen[:3], seen[3:6], seen[6:])] == [3, 3, 1]
    assert sorted(i.serial for i in seen) == sorted(r.serial for r in issued), "no gap, no duplicate"
    keys = [(i.not_after, i.request_id) for i in seen]
    assert keys == sorted(keys) and len(set(keys)) == 7
    exact = await _search(nats_client, requester=requester, limit=7)
    assert len(exact.items) == 7 and exact.next_cursor is None, "a full last page has no next cursor"


async def test_bad_search_input_gets_a_structured_error(nats_client) -> None:
    async def raw(body: bytes) -> SearchReply:
        return SearchReply.model_validate_json(await nats_client.raw(subjects.CLM_SEARCH, body))

    garbage = await raw(b'{"cursor": "bm90IGEgY3Vyc29y"}')
    assert garbage.error is not None and garbage.error.code is ErrorCode.INVALID_CURSOR
    assert garbage.error.details["field"] == "cursor"
    for body, field in [(b'{"limit": 0}', "limit"), (b'{"limit": 501}', "limit"),
                        (b'{"expiring_before": "2027-01-01T00:00:00"}', "expiring_before"),
                        (b'{"expiring_before": "next week"}', "expiring_before"),
                        (b'{"status": "pending"}', "status"), (b'{"owner": "me"}', "owner")]:
        reply = await raw(body)
        assert reply.error is not None and reply.error.code is ErrorCode.MALFORMED_MESSAGE, body
        assert reply.error.details["problems"][0]["field"] == field, reply.error
    not_json = await raw(b"{nope")
    assert not_json.error is not None and not_json.error.code is ErrorCode.MALFORMED_MESSAGE


async def test_search_over_rest(nats_client, rig, http) -> None:
    requester = f"rest-{_tag()}"
    issued = {(await _issue(nats_client, [f"r{i}-{_tag()}.example.com"], requester)).serial for i in range(3)}

    async def get(params: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
        async with http.get(f"{rig.clm_url}/v1/certificates", params=params) as resp:
            return resp.status, await resp.json()

    status, first = await get([("requester", requester), ("limit", "2")])
    assert status == 200 and len(first["items"]) == 2 and first["next_cursor"], first
    status, second = await get([("requester", requester), ("limit", "2"), ("cursor", first["next_cursor"])])
    assert status == 200 and second["next_cursor"] is None
    assert {i["serial"] for i in first["items"] + second["items"]} == issued
    status, soon = await get([("requester", requester), ("status", "valid"),
                              ("expiring_before", (utcnow() + timedelta(days=91)).isoformat())])
    assert status == 200 and len(soon["items"]) == 3
    for params, code in [([("cursor", "garbage")], "INVALID_CURSOR"), ([("limit", "0")], "MALFORMED_MESSAGE"),
                         ([("limit", "x")], "MALFORMED_MESSAGE"), ([("expiring_before", "soon")], "MALFORMED_MESSAGE"),
                         ([("owner", "me")], "MALFORMED_MESSAGE"),
                         ([("requester", "a"), ("requester", "b")], "MALFORMED_MESSAGE")]:
        status, body = await get(params)
        assert (status, body["error"]["code"]) == (400, code), (params, body)


# --- renew ---

async def test_renew_same_names_new_key_linked_and_idempotent(nats_client, sql) -> None:
    tag, requester = _tag(), f"renew-{_tag()}"
    names = [f"www-{tag}.example.com", f"api-{tag}.example.com", "192.0.2.10"]
    old = await _issue(nats_client, names, requester, cn=names[0])
    csr_pem, _ = make_csr(list(reversed(names)), key=make_key("p256", fresh=True), cn=names[0].upper())
    request = RenewCertificate(serial=old.serial, csr_pem=csr_pem, requester=requester, idempotency_key="renew-1")
    new = await nats_client.renew(request)
    assert new.error is None and new.serial and new.serial != old.serial, new
    assert new.not_after >= old.not_after  # whole seconds: may be equal
    again = await nats_client.renew(request)
    assert (again.request_id, again.serial) == (new.request_id, new.serial), "a repeat is not a second certificate"
    rows = await query(sql, "SELECT id, profile, renews_serial FROM requests WHERE renews_serial = %s", (old.serial,))
    assert rows == [(new.request_id, "tls-server", old.serial)]
    # The predecessor revoked as superseded, then the client repeats (its first reply was lost): the same answer.
    await _revoke(nats_client, old.serial)
    replay = await nats_client.renew(request)
    assert (replay.error, replay.request_id, replay.serial) == (None, new.request_id, new.serial)
    other_key = await nats_client.renew(request.model_copy(update={"idempotency_key": "renew-2"}))
    assert other_key.error is not None and other_key.error.code is ErrorCode.NOT_RENEWABLE
    found = await _search(nats_client, serial=new.serial)
    assert [(i.renews_serial, i.requester) for i in found.items] == [(old.serial, requester)]
    # Profile defaults to the predecessor's.
    client_cert = await _issue(nats_client, [f"c-{tag}.example.com"], requester, profile="tls-client")
    renewed = await nats_client.renew(RenewCertificate(
        serial=client_cert.serial, requester=requester,
        csr_pem=make_csr([f"c-{tag}.example.com"], key=make_key("p256", fresh=True))[0]))
    assert renewed.error is None, renewed.error
    assert (await query(sql, "SELECT profile FROM requests WHERE id = %s", (renewed.request_id,))) == [("tls-client",)]


async def test_renew_refusals_have_their_codes_and_record_nothing(nats_client, sql) -> None:
    tag, requester = _tag(), f"refuse-{_tag()}"
    names = [f"x-{tag}.example.com", f"y-{tag}.example.com"]
    old = await _issue(nats_client, names, requester, cn=names[0])

    async def renew(names: list[str], cn: str | None = names[0], **fields: Any) -> IssueReply:
        csr_pem, _ = make_csr(names, key=make_key("p256", fresh=True), cn=cn)
        return await nats_client.renew(RenewCertificate(**{"serial": old.serial, "csr_pem": csr_pem,
                                                           "requester": requester, **fields}))

    extra = await renew([*names, f"z-{tag}.example.com"])
    assert extra.error is not None and extra.error.code is ErrorCode.NAMES_MISMATCH
    assert extra.error.details["extra"] == [f"dns:z-{tag}.example.com"] and extra.error.details["missing"] == []
    missing = await renew(names[:1])
    assert missing.error is not None and missing.error.code is ErrorCode.NAMES_MISMATCH
    assert missing.error.details["missing"] == [f"dns:{names[1]}"]
    no_cn = await renew(names, cn=None)
    assert no_cn.error is not None and no_cn.error.code is ErrorCode.NAMES_MISMATCH
    other = await renew(names, requester="someone-else")
    assert other.error is not None and other.error.code is ErrorCode.REQUESTER_MISMATCH
    unknown = await renew(names, serial="ab" * 19)
    assert unknown.error is not None and unknown.error.code is ErrorCode.NOT_FOUND
    forbidden = await renew(names, profile="no-such-profile")
    assert forbidden.error is not None and forbidden.error.code is ErrorCode.UNKNOWN_PROFILE
    garbage = await nats_client.renew(RenewCertificate(serial=old.serial, csr_pem="junk", requester=requester))
    assert garbage.error is not None and garbage.error.code is ErrorCode.MALFORMED_CSR
    await _revoke(nats_client, old.serial)
    revoked = await renew(names)
    assert revoked.error is not None and revoked.error.code is ErrorCode.NOT_RENEWABLE
    assert await query(sql, "SELECT COUNT(*) FROM requests WHERE renews_serial = %s", (old.serial,)) == [(0,)]


async def test_renew_over_rest(nats_client, rig, http) -> None:
    tag, requester = _tag(), f"rest-renew-{_tag()}"
    name = f"rest-{tag}.example.com"
    old = await _issue(nats_client, [name], requester)

    async def post(serial: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with http.post(f"{rig.clm_url}/v1/certificates/{serial}/renew", json=body) as resp:
            return resp.status, await resp.json()

    def body(names: list[str], **fields: Any) -> dict[str, Any]:
        return {"csr_pem": make_csr(names, key=make_key("p256", fresh=True))[0], "requester": requester, **fields}

    status, reply = await post(old.serial, body([name]))
    assert status == 200 and reply["status"] == "issued" and reply["serial"] != old.serial, reply
    for serial, payload, expected in [
        (old.serial, body([name, f"more-{tag}.example.com"]), (422, "NAMES_MISMATCH")),
        (old.serial, body([name], requester="mallory"), (403, "REQUESTER_MISMATCH")),
        ("cd" * 19, body([name]), (404, "NOT_FOUND")),
        (old.serial, body([name], serial=old.serial), (400, "MALFORMED_MESSAGE")),
        (old.serial, body([name], colour="red"), (400, "MALFORMED_MESSAGE")),
        ("NOT-HEX", body([name]), (400, "MALFORMED_MESSAGE")),
    ]:
        status, reply = await post(serial, payload)
        assert (status, reply["error"]["code"]) == expected, reply
    await _revoke(nats_client, old.serial)
    status, reply = await post(old.serial, body([name]))
    assert (status, reply["error"]["code"]) == (409, "NOT_RENEWABLE")


# --- expiry ---

async def _stream_notices(env: LocalEnv, serial: str) -> list[int]:
    """The windows of every message about `serial` in stream PKI_EXPIRY (duplicates included), read as admin
    (CLM's bus user may publish there, not read)."""
    nc = await nats.connect(**env.nats.connect_kwargs())
    try:
        js = nc.jetstream()
        state = (await js.stream_info(subjects.EXPIRY_STREAM)).state
        windows = []
        # A stream that never held a message reports first_seq 0, which get_msg refuses (400): nothing to read.
        for seq in range(max(state.first_seq, 1), state.last_seq + 1):
            try:
                msg = await js.get_msg(subjects.EXPIRY_STREAM, seq)
            except NotFoundError:
                continue
            event = CertificateExpiring.model_validate_json(msg.data)
            if event.serial == serial:
                windows.append(event.window_seconds)
        return sorted(windows)
    finally:
        await nc.close()


async def _notice_rows(sql: aiomysql.Connection, serial: str) -> list[tuple[int, bool]]:
    return [(w, p) for w, p in await query(
        sql, "SELECT window_seconds, published_at IS NOT NULL FROM expiry_notices WHERE serial = %s"
             " ORDER BY window_seconds", (serial,))]


async def test_expiry_notice_once_per_window_even_with_two_schedulers(env, nats_client, rig, sql) -> None:
    requester = f"exp-{_tag()}"
    cert = await _issue(nats_client, [f"e-{_tag()}.example.com"], requester)  # 90 days
    revoked = await _issue(nats_client, [f"rv-{_tag()}.example.com"], requester)
    await _revoke(nats_client, revoked.serial)
    renewed_name = f"rn-{_tag()}.example.com"
    renewed = await _issue(nats_client, [renewed_name], requester)
    successor = await nats_client.renew(RenewCertificate(
        serial=renewed.serial, requester=requester,
        csr_pem=make_csr([renewed_name], key=make_key("p256", fresh=True))[0]))
    assert successor.error is None
    clm = rig.clm

    await clm.expiry.run_once()
    assert await _stream_notices(env, cert.serial) == [], "90 days left: in no window"
    rig.clock.offset = timedelta(days=61)  # 29 days left: in the 30-day window only
    other = _clm(env, rig.clock, member="clm-2")
    await other.start()
    try:
        await asyncio.gather(clm.expiry.run_once(), other.expiry.run_once())  # a split brain, or a failover
        await clm.expiry.run_once()
        await other.expiry.run_once()
    finally:
        await other.stop()
    assert await _stream_notices(env, cert.serial) == [30 * DAY]
    assert await _notice_rows(sql, cert.serial) == [(30 * DAY, True)]
    assert await _stream_notices(env, revoked.serial) == [], "revoked: no notice"
    assert await _stream_notices(env, renewed.serial) == [], "renewed: no notice for the predecessor"

    rig.clock.offset = timedelta(days=84)  # 6 days left: the 7-day window too
    await clm.expiry.run_once()
    await clm.expiry.run_once()
    assert await _stream_notices(env, cert.serial) == [7 * DAY, 30 * DAY]
    event = next(e for e in [CertificateExpiring.model_validate_json(r[0]) for r in await query(
        sql, "SELECT event FROM expiry_notices WHERE serial = %s AND window_seconds = %s", (cert.serial, 7 * DAY))])
    assert (event.request_id, event.requester, event.not_after, event.issuer) == (
        cert.request_id, requester, cert.not_after, "issuing-1")

    rig.clock.offset = timedelta(days=91)  # expired: nothing more
    await clm.expiry.run_once()
    assert await _stream_notices(env, cert.serial) == [7 * DAY, 30 * DAY]


async def test_expiry_crash_after_record_or_after_publish_loses_nothing_and_duplicates_nothing(
        env, nats_client, rig, sql) -> None:
    clm, inventory = rig.clm, rig.clm.expiry._store
    recorded_only = await _issue(nats_client, [f"cr-{_tag()}.example.com"], "crash")
    published_unmarked = await _issue(nats_client, [f"cp-{_tag()}.example.com"], "crash")
    rig.clock.offset = timedelta(days=61)
    # Step 1 only, as if the scheduler died right after recording.
    await inventory.record_expiring(WINDOWS, rig.clock(), 10_000)
    assert await _notice_rows(sql, recorded_only.serial) == [(30 * DAY, False)]
    # One of them also published (acked by the stream) but not marked, as if it died between steps 2 and 3.
    notice = next(n for n in await inventory.unpublished_notices(10_000) if n.serial == published_unmarked.serial)
    await clm.expiry._publisher.expiring(notice)
    assert await _stream_notices(env, recorded_only.serial) == []
    await clm.expiry.run_once()
    assert await _stream_notices(env, recorded_only.serial) == [30 * DAY], "recorded, then published next run"
    assert await _stream_notices(env, published_unmarked.serial) == [30 * DAY], "republished, the stream dropped it"
    for serial in (recorded_only.serial, published_unmarked.serial):
        assert await _notice_rows(sql, serial) == [(30 * DAY, True)]


async def test_an_expiry_batch_is_a_fixed_number_of_statements_and_moves_each_certificate_on(
        env, nats_client, rig, sql) -> None:
    """One batch used to send an UPDATE per certificate: 500 round trips, which on a busy host outlasted the
    transaction bound, so the batch never committed and every timeout moved CLM to another database node. Now the
    statements of a batch do not depend on its size, and each certificate still gets its own next check."""
    inventory = rig.clm.expiry._store
    await inventory.record_expiring(WINDOWS, rig.clock(), 10_000)  # what earlier tests left unseen
    certs = [await _issue(nats_client, [f"eb-{i}-{_tag()}.example.com"], "expiry-batch") for i in range(6)]
    with own_statements() as statements:
        batch = await inventory.record_expiring(WINDOWS, rig.clock(), 10_000)
    assert batch.examined == len(certs) and not batch.more
    assert len(statements) == 3, statements  # the unseen, the due, one UPDATE (no notice: 90 days left)
    rows = dict(await query(sql, "SELECT serial, expiry_check_at FROM requests WHERE requester = %s",
                            ("expiry-batch",)))
    for cert in certs:  # 90-day certificates: the 30-day window opens next, each at its own time
        assert rows[cert.serial] == (cert.not_after - timedelta(days=30)).replace(tzinfo=None), cert.serial


async def test_marking_notices_published_is_one_statement_and_marks_only_those(
        env, nats_client, rig, sql) -> None:
    inventory = rig.clm.expiry._store
    certs = [await _issue(nats_client, [f"mp-{i}-{_tag()}.example.com"], "mark-published") for i in range(3)]
    rig.clock.offset = timedelta(days=61)  # inside the 30-day window
    await inventory.record_expiring(WINDOWS, rig.clock(), 10_000)
    ours = {cert.serial for cert in certs}
    notices = [n for n in await inventory.unpublished_notices(10_000) if n.serial in ours]
    assert len(notices) == 3
    with own_statements() as statements:
        await inventory.mark_published(notices[:2], rig.clock())
    assert len(statements) == 1, statements
    marked = {n.serial for n in notices[:2]}
    for cert in certs:
        assert await _notice_rows(sql, cert.serial) == [(30 * DAY, cert.serial in marked)]


async def _wait_for(predicate, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_expiry_scheduler_runs_only_on_the_vip_holder(env, nats_client, rig, sql) -> None:
    cert = await _issue(nats_client, [f"vip-{_tag()}.example.com"], "vip")
    clock = ShiftedClock()
    clock.offset = timedelta(days=61)

    async def noticed() -> bool:
        return await _notice_rows(sql, cert.serial) == [(30 * DAY, True)]

    passive = _clm(env, clock, member="clm-passive", vip="192.0.2.77", expiry_interval_seconds=0.05)
    await passive.start()
    try:
        assert not passive.holds_vip()
        assert not await _wait_for(noticed, 1.0), "a member without the VIP sent expiry notices"
    finally:
        await passive.stop()
    active = _clm(env, clock, member="clm-active", vip="127.0.0.1", expiry_interval_seconds=0.05)
    await active.start()
    try:
        assert active.holds_vip()
        assert await _wait_for(noticed, 10.0), "the VIP holder did not send the expiry notice"
    finally:
        await active.stop()
    assert await _stream_notices(env, cert.serial) == [30 * DAY]


# --- indexes (last: it adds synthetic rows) ---

SYNTHETIC = 4000


async def _handler_reads(conn: aiomysql.Connection, statement: str, args: tuple) -> tuple[int, int]:
    """(rows returned, rows the storage engine stepped through) for one statement on this session."""

    async def counters() -> dict[str, int]:
        rows = await query(conn, "SHOW SESSION STATUS LIKE 'Handler_read%%'")
        return {name: int(value) for name, value in rows}

    before = await counters()
    result = await query(conn, statement, args)
    after = await counters()
    baseline_before = await counters()
    baseline = await counters()  # what SHOW STATUS itself costs
    stepped = ("Handler_read_next", "Handler_read_prev", "Handler_read_rnd_next", "Handler_read_rnd")
    cost = sum(after[k] - before[k] for k in stepped) - sum(baseline[k] - baseline_before[k] for k in stepped)
    return len(result), cost


async def test_hot_filters_read_about_a_page_not_the_table(sql) -> None:
    now = utcnow().replace(tzinfo=None)
    approved = SignCertificate(request_id="0" * 32, profile="tls-server", csr_pem="synthetic", dns_names=["s"],
                               validity_seconds=DAY, key_usage=["digital_signature"],
                               extended_key_usage=["server_auth"]).model_dump_json()
    rows, names, certificates = [], [], []
    never = NEVER.replace(tzinfo=None)  # as if the expiry scheduler were done with them
    [(issuer,)] = await query(sql, "SELECT name FROM issuers WHERE is_default = 1")
    for i in range(SYNTHETIC):
        request_id = f"ffffffff{i:024x}"
        # Half long expired, half far in the future: the expiry scheduler never picks them.
        not_after = now + timedelta(days=-1000 if i % 2 else 1000, seconds=i)
        # One row in a hundred has the rare requester, profile, or is revoked: without an index leading with
        # that column, a page of them would step through about a thousand rows.
        rows.append((request_id, "synthetic-rare" if i % 100 == 0 else "synthetic",
                     "rare-profile" if i % 100 == 50 else "tls-server", "0" * 64, approved, "issued",
                     f"5e{i:036x}", issuer, not_after, int(i % 100 == 25), never, now, now))
        names += [(request_id, "cn", f"syn{i}.example.com"), (request_id, "dns", f"syn{i}.example.com")]
        # A search by serial finds the request through its certificate (requests.serial has no index).
        certificates.append((issuer, f"5e{i:036x}", request_id, f"eeeeeeee{i:024x}", 0, "synthetic", now, not_after,
                             now))
    async with sql.cursor() as cur:
        await cur.executemany(
            "INSERT INTO requests (id, requester, profile, csr_sha256, sign_request, status, serial, issuer, not_after,"
            " revoked, expiry_check_at, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
        await cur.executemany("INSERT INTO request_names (request_id, kind, value) VALUES (%s, %s, %s)", names)
        await cur.executemany(
            "INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem, not_before, not_after,"
            " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", certificates)
        await cur.execute("ANALYZE TABLE requests, request_names, certificates")
        await cur.fetchall()
    utc_now = utcnow()
    first_page = await query(sql, *search_statement(SearchCertificates(requester="synthetic-rare", limit=10), None,
                                                    utc_now))
    after = Position(first_page[9][5].replace(tzinfo=utc_now.tzinfo), first_page[9][0])
    cases: list[tuple[dict[str, Any], Position | None, int]] = [
        ({}, None, 10), ({"requester": "synthetic-rare"}, None, 10), ({"requester": "synthetic-rare"}, after, 10),
        ({"requester": "synthetic"}, None, 10), ({"profile": "rare-profile"}, None, 10),
        ({"status": "valid"}, None, 10), ({"status": "expired"}, None, 10), ({"status": "revoked"}, None, 10),
        ({"expiring_before": utc_now - timedelta(days=500)}, None, 10),
        ({"requester": "synthetic", "status": "valid"}, None, 10), ({"serial": f"5e{1234:036x}"}, None, 1),
        ({"san": "syn1234.example.com"}, None, 1), ({"subject": "SYN77.example.com"}, None, 1),
    ]
    for filters, position, expected in cases:
        statement, args = search_statement(SearchCertificates(limit=10, **filters), position, utc_now)
        returned, stepped = await _handler_reads(sql, statement, args)
        assert returned >= expected, (filters, returned)
        # A table scan steps through at least SYNTHETIC rows; a keyset page about limit + 1 index entries.
        print(f"{filters} after={position is not None}: {returned} rows, {stepped} read")
        assert stepped < 100, f"{filters}: {stepped} rows read for a page of {returned}"
        plan = await query(sql, "EXPLAIN " + statement, args)
        assert all(row[3] != "ALL" for row in plan if row[2] == "r"), (filters, plan)
    # The expiry scheduler's scans: what needs work (here: nothing), not every certificate.
    for statement, args in [(UNSEEN_FOR_EXPIRY, (500,)), (DUE_FOR_EXPIRY, (utc_now.replace(tzinfo=None), 500))]:
        returned, stepped = await _handler_reads(sql, statement, args)
        print(f"expiry scan: {returned} rows, {stepped} read")
        assert stepped < returned + 20, f"expiry scan read {stepped} rows for {returned}"
