"""Per-requester token buckets: the bucket itself, its bound on memory, and how ClmService and the HTTP edge use it."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hapki.clm import http
from hapki.clm.app import bus_caller
from hapki.clm.config import ClmConfig
from hapki.clm.main import rate_limiter
from hapki.clm.ratelimit import Rate, RateLimiter, caller, retry_after_header
from hapki.lab import render
from hapki.contracts.errors import ErrorCode, RateLimited
from hapki.contracts.models import CertificateIssued, RequestStatus
from test_service import NOW, Queue, SlowStore, _request, _service


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(per_second=2, burst=3), clock=clock)
    for _ in range(3):
        limiter.check("alice")
    with pytest.raises(RateLimited) as info:
        limiter.check("alice")
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.retryable
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.details == {"field": "requester", "limit_per_second": 2, "burst": 3, "retry_after_seconds": 0.5}
    limiter.check("bob")  # another requester has its own bucket
    clock.now += 0.5
    limiter.check("alice")  # one token back after 1/rate seconds
    with pytest.raises(RateLimited):
        limiter.check("alice")
    clock.now += 60
    for _ in range(3):  # refilled, but never beyond the burst
        limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")


def test_a_refused_request_takes_no_token() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(per_second=1, burst=1), clock=clock)
    limiter.check("alice")
    for _ in range(100):  # hammering while empty does not push the next token further away
        with pytest.raises(RateLimited):
            limiter.check("alice")
    clock.now += 1.0
    limiter.check("alice")


def test_overrides_replace_the_default_for_one_requester() -> None:
    limiter = RateLimiter(Rate(1, 1), overrides={"bench": Rate(1000, 500)}, clock=Clock())
    for _ in range(500):
        limiter.check("bench")
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")


def test_memory_is_bounded_least_recently_used_first() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(1, 1), max_requesters=100, clock=clock)
    limiter.check("keep")
    for index in range(10_000):
        limiter.check(f"r{index}")
        if index % 50 == 0:
            with pytest.raises(RateLimited):
                limiter.check("keep")  # recently used: stays, still empty
    assert len(limiter) == 100


def test_config_defaults_are_a_guard_above_the_benchmarks_rate() -> None:
    config = ClmConfig.model_validate({
        "member": "clm-1", "nats": {"servers": ["nats://127.0.0.1:4222"]},
        "database": {"nodes": ["127.0.0.1:3306"], "user": "u", "database": "d"}, "approval_key_file": "/nonexistent/key",
        "rate_limit": {"overrides": {"slow": {"per_second": 0.5, "burst": 2}}},
    })
    limiter = rate_limiter(config.rate_limit)
    for _ in range(2000):
        limiter.check("hapki-bench")
    limiter.check("slow")
    limiter.check("slow")
    with pytest.raises(RateLimited):
        limiter.check("slow")
    with pytest.raises(ValueError):
        ClmConfig.model_validate({**config.model_dump(), "rate_limit": {"default": {"per_second": 0, "burst": 1}}})


def test_retry_after_header_is_whole_seconds_at_least_one() -> None:
    assert [retry_after_header(s) for s in (0.001, 1.0, 1.2)] == ["1", "1", "2"]


async def test_the_service_limits_before_parsing_and_spares_retries_of_a_known_attempt() -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    service._limiter = RateLimiter(Rate(per_second=0.001, burst=1), clock=Clock())
    service._wait = 5.0
    store.release.set()
    request = _request(["a.example.com"], "k1")
    first = asyncio.create_task(service.issue(request))
    while not queue.submitted:
        await asyncio.sleep(0.001)
    joined = asyncio.create_task(service.issue(request))  # a retry while in progress: joined, not charged
    await asyncio.sleep(0.01)
    service.on_issued(CertificateIssued(request_id=queue.submitted[0].request_id, serial="0a", issuer="issuing-1",
                                        certificate_pem="c", chain_pem="p", not_before=NOW, not_after=NOW))
    assert (await first).status is RequestStatus.ISSUED and (await joined).status is RequestStatus.ISSUED
    assert (await service.issue(request)).serial == "0a"  # a retry after the answer: not charged either
    garbage = request.model_copy(update={"csr_pem": "not a CSR", "idempotency_key": "k2"})
    with pytest.raises(RateLimited):  # a new request: the bucket is empty; refused before the CSR is parsed
        await service.issue(garbage)
    assert len(store.records) == 1


async def test_http_maps_rate_limited_to_429_with_retry_after() -> None:
    store, queue = SlowStore(), Queue()
    service = _service(store, queue)
    service._limiter = RateLimiter(Rate(per_second=0.25, burst=1), clock=Clock())
    store.release.set()
    client = TestClient(TestServer(http.build_app(service, member="clm-1")))
    await client.start_server()
    try:
        body = _request(["a.example.com"], None).model_dump(mode="json")
        first = await client.post("/v1/issue", json=body)
        assert first.status == 202
        second = await client.post("/v1/issue", json=body)
        assert second.status == 429 and second.headers["Retry-After"] == "4"
        error = json.loads(await second.text())["error"]
        assert error["code"] == "RATE_LIMITED" and error["details"]["retry_after_seconds"] == 4.0
    finally:
        await client.close()


def test_every_error_code_has_an_http_status() -> None:
    assert set(http.STATUS_BY_CODE) == set(ErrorCode)


def test_buckets_key_on_the_authenticated_caller_when_the_edge_names_one() -> None:
    limiter = RateLimiter(Rate(per_second=1, burst=1), clock=Clock())
    with caller("bus:client"):
        limiter.check("alice")
        with pytest.raises(RateLimited) as info:
            limiter.check("bob")  # a new name is no new bucket
        assert "bus:client" in str(info.value) and info.value.details["field"] == "caller"
    with caller("bus:client-b"):
        limiter.check("alice")  # borrowing a name does not drain that name's holder
    limiter.check("alice")  # no caller (the services' own account): the requester's bucket, untouched so far
    with pytest.raises(RateLimited):
        limiter.check("alice")


@pytest.mark.parametrize(("headers", "expected"), [
    (None, None),
    ({}, None),
    ({"Nats-Request-Info": '{"acc": "CLIENTS", "user": "client", "rtt": 1}'}, "bus:client"),
    ({"Nats-Request-Info": '{"acc": "CLIENTS"}'}, "bus-account:CLIENTS"),
    ({"Nats-Request-Info": "not json"}, "bus-account:?"),
    ({"Nats-Request-Info": '["user"]'}, "bus-account:?"),
    ({"Nats-Request-Info": '{"user": 7}'}, "bus-account:?"),
])
def test_bus_caller_reads_the_servers_header(headers: dict[str, str] | None, expected: str | None) -> None:
    assert bus_caller(headers) == expected


async def test_http_keys_on_the_forwarded_address_only_from_a_trusted_proxy() -> None:
    async def run(trusted: tuple[str, ...]) -> list[int]:
        store, queue = SlowStore(), Queue()
        service = _service(store, queue)
        service._limiter = RateLimiter(Rate(per_second=0.001, burst=1), clock=Clock())
        store.release.set()
        client = TestClient(TestServer(http.build_app(service, member="clm-1", trusted_proxies=trusted)))
        await client.start_server()
        statuses = []
        try:
            for index, forwarded in enumerate(["203.0.113.1", "203.0.113.2", "203.0.113.2", "garbage"]):
                body = _request([f"a{index}.example.com"], None).model_dump(mode="json")
                statuses.append((await client.post("/v1/issue", json=body,
                                                   headers={"X-Forwarded-For": forwarded})).status)
        finally:
            await client.close()
        return statuses

    # The test client connects from 127.0.0.1: trusted, each forwarded address its own bucket (garbage: the
    # proxy's own); not trusted, the header is ignored and every request is the peer's.
    assert await run(("127.0.0.1",)) == [202, 202, 429, 202]
    assert await run(()) == [202, 429, 429, 429]


def test_haproxy_sets_the_forwarded_address_rather_than_appending_to_the_clients() -> None:
    text = render.template("haproxy.cfg").template
    assert "http-request set-header X-Forwarded-For %[src]" in text and "option forwardfor" not in text
