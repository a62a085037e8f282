"""OcspCache and the responder on it: produced once, served from memory, dropped on revocation, never trusted stale."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hapki.cara.config import OcspConfig
from hapki.cara.http import cache_headers
from hapki.cara.ocsp import OcspResponder
from hapki.cara.ocsp_cache import PRODUCTION_WINDOW_SECONDS, OcspCache, Signed
from hapki.cara.ports import IssuerRecord, SerialStatus
from hapki.contracts.errors import Unavailable

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Feed:
    """Revocations as the database would report them: every serial revoked after watermark `after`."""

    def __init__(self) -> None:
        self.revoked: list[tuple[int, str]] = []  # (watermark at which it became visible, serial)
        self.watermark = 7
        self.calls = 0
        self.fail: Exception | None = None

    def revoke(self, serial: str) -> None:
        self.revoked.append((self.watermark, serial))

    async def revocations_since(self, issuer: str, after: int | None) -> tuple[list[str], int]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if after is None:
            return [], self.watermark
        return [s for w, s in self.revoked if w >= after], self.watermark


def _signed(status: str, tag: bytes = b"") -> Signed:
    return Signed(der=status.encode() + tag, status=status, this_update=NOW, next_update=NOW + timedelta(hours=1))


async def _synced(cache: OcspCache, clock: Clock) -> None:
    """A successful poll, then a moment passes (reads that begin at the very instant of a drop are not kept)."""
    await cache.sync()
    clock.t += 0.001


def _cache(feed: Feed, clock: Clock, **kw: float) -> OcspCache:
    args = {"entries": 3, "refresh_after": 600.0, "poll": 1.0, "staleness": 3.0} | kw
    return OcspCache(feed=feed, issuer="issuing-1", monotonic=clock, **args)  # type: ignore[arg-type]


class Producer:
    def __init__(self, status: str = "good") -> None:
        self.status, self.calls = status, 0

    async def __call__(self) -> Signed:
        self.calls += 1
        await asyncio.sleep(0)
        return _signed(self.status, str(self.calls).encode())


async def test_a_response_is_produced_once_and_then_served_from_memory() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)
    produce = Producer()
    first, hit = await cache.get("ab", "sha1", produce)
    assert (first.status, hit, produce.calls) == ("good", False, 1)
    again, hit = await cache.get("ab", "sha1", produce)
    assert (again, hit, produce.calls) == (first, True, 1)
    # Another CertID hash algorithm is another response (the CertID is echoed in it).
    assert (await cache.get("ab", "sha256", produce))[1] is False and produce.calls == 2


async def test_concurrent_misses_produce_once() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)
    produce = Producer()
    answers = await asyncio.gather(*(cache.get("ab", "sha1", produce) for _ in range(20)))
    assert produce.calls == 1 and len({a[0] for a in answers}) == 1


async def test_a_revocation_event_drops_the_good_answer_at_once() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)
    await cache.get("ab", "sha1", Producer("good"))
    cache.invalidate("00ab")  # events may carry leading zeros; keys are canonical hex
    assert cache.lookup("ab", "sha1") is None
    signed, hit = await cache.get("ab", "sha1", Producer("revoked"))
    assert (signed.status, hit) == ("revoked", False)
    cache.invalidate("ab")  # a revoked answer is final: kept
    assert cache.lookup("ab", "sha1") == signed


async def test_the_poll_drops_revocations_the_event_did_not_bring() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)
    await cache.get("ab", "sha1", Producer("good"))
    await cache.get("cd", "sha1", Producer("good"))
    feed.revoke("ab")
    clock.t += 1
    await _synced(cache, clock)
    assert cache.lookup("ab", "sha1") is None and cache.lookup("cd", "sha1") is not None


async def test_cached_answers_stop_when_the_poll_has_not_succeeded_for_the_staleness_bound() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    assert not cache.trusted()  # never polled: nothing served from memory
    await _synced(cache, clock)
    await cache.get("ab", "sha1", Producer("good"))
    feed.fail = Unavailable("database away")
    clock.t += 2.9
    with pytest.raises(Unavailable):
        await _synced(cache, clock)
    assert cache.lookup("ab", "sha1") is not None  # the last good poll began 2.9 s ago: within 3 s
    clock.t += 0.2
    assert not cache.trusted() and cache.lookup("ab", "sha1") is None
    # Untrusted: every request is produced (live read; the responder turns a database error into tryLater).
    produce = Producer("good")
    assert (await cache.get("ab", "sha1", produce))[1] is False and produce.calls == 1
    feed.fail = None
    await _synced(cache, clock)
    assert cache.trusted() and cache.lookup("ab", "sha1") is not None


async def _revoked_during_a_production() -> tuple[OcspCache, asyncio.Task[tuple[Signed, bool]], asyncio.Event]:
    """A production that read 'good' and waits on the returned gate; the serial is invalidated meanwhile."""
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)
    gate = asyncio.Event()

    async def slow_good() -> Signed:
        await gate.wait()
        return _signed("good")

    pending = asyncio.create_task(cache.get("ab", "sha1", slow_good))
    await asyncio.sleep(0)
    clock.t += 0.01
    cache.invalidate("ab")
    return cache, pending, gate


async def test_a_read_that_raced_a_revocation_is_returned_but_not_kept() -> None:
    cache, pending, gate = await _revoked_during_a_production()
    gate.set()
    signed, _ = await pending
    assert signed.status == "good"  # its caller asked before the revocation was known
    assert cache.lookup("ab", "sha1") is None  # but nobody else gets it


async def test_a_request_after_a_revocation_does_not_join_a_production_begun_before_it() -> None:
    cache, early, gate = await _revoked_during_a_production()
    late = asyncio.create_task(cache.get("ab", "sha1", Producer("revoked")))
    await asyncio.sleep(0.01)
    gate.set()
    assert (await early)[0].status == "good" and (await late)[0].status == "revoked"
    assert cache.lookup("ab", "sha1").status == "revoked"


async def test_a_production_older_than_the_window_is_not_kept() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)

    async def very_slow() -> Signed:
        clock.t += PRODUCTION_WINDOW_SECONDS + 1
        return _signed("good")

    await cache.get("ab", "sha1", very_slow)
    assert len(cache) == 0


async def test_the_first_successful_poll_drops_what_was_kept_before_it() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await cache.get("ab", "sha1", Producer("good"))  # kept while untrusted (a live read)
    assert len(cache) == 1
    clock.t += 1
    await cache.sync()  # no watermark to compare with: whatever happened meanwhile is unknown
    assert len(cache) == 0


async def test_old_responses_are_refreshed_in_the_background_and_served_meanwhile() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock, refresh_after=600.0)
    await _synced(cache, clock)
    produce = Producer("good")
    first, _ = await cache.get("ab", "sha1", produce)
    clock.t += 601
    await _synced(cache, clock)
    served, hit = await cache.get("ab", "sha1", produce)
    assert served == first and hit  # the old one, at once
    await asyncio.sleep(0.01)
    assert produce.calls == 2 and cache.lookup("ab", "sha1") != first


async def test_least_recently_used_certificates_are_dropped_beyond_capacity() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock, entries=2)
    await _synced(cache, clock)
    for serial in ("1", "2"):
        await cache.get(serial, "sha1", Producer())
    cache.lookup("1", "sha1")  # used: 2 is now the oldest
    await cache.get("3", "sha1", Producer())
    assert cache.lookup("2", "sha1") is None and cache.lookup("1", "sha1") is not None


async def test_a_failed_production_is_not_kept_and_the_next_request_tries_again() -> None:
    feed, clock = Feed(), Clock()
    cache = _cache(feed, clock)
    await _synced(cache, clock)

    async def failing() -> Signed:
        raise Unavailable("database away")

    with pytest.raises(Unavailable):
        await cache.get("ab", "sha1", failing)
    produce = Producer()
    assert (await cache.get("ab", "sha1", produce))[1] is False and produce.calls == 1


async def test_the_poll_loop_survives_failures_and_stops_on_cancel() -> None:
    feed, clock = Feed(), Clock()
    feed.fail = Unavailable("database away")
    cache = _cache(feed, clock, poll=0.01, staleness=0.5)
    task = asyncio.create_task(cache.run())
    await asyncio.sleep(0.05)
    assert feed.calls >= 2 and not cache.trusted()
    feed.fail = None
    await asyncio.sleep(0.05)
    assert cache.trusted()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_config_bounds() -> None:
    config = OcspConfig()
    assert config.refresh_after_seconds == 1800 and config.revocation_bound_seconds == 8.0
    with pytest.raises(ValueError, match="refresh_seconds"):
        OcspConfig(validity_seconds=600, refresh_seconds=600)
    with pytest.raises(ValueError, match="revocation_poll_seconds"):
        OcspConfig(revocation_poll_seconds=3, max_staleness_seconds=3)
    with pytest.raises(ValueError):
        _cache(Feed(), Clock(), poll=3.0, staleness=3.0)


def test_cache_headers_never_outlive_next_update() -> None:
    signed = _signed("good")
    headers = cache_headers(signed, 5, NOW)
    assert headers["Cache-Control"] == "max-age=5, public, no-transform, must-revalidate"
    assert headers["Last-Modified"] == "Thu, 26 Nov 2026 12:00:00 GMT" and headers["ETag"].startswith('"')
    late = cache_headers(signed, 5, NOW + timedelta(minutes=59, seconds=58))
    assert late["Cache-Control"].startswith("max-age=2,")
    assert cache_headers(signed, 5, NOW + timedelta(hours=2))["Cache-Control"].startswith("max-age=0,")


# --- the responder on the cache (software keys, a fake status store) ----------------------------------------------

class Store:
    def __init__(self) -> None:
        self.statuses: dict[str, SerialStatus] = {}
        self.reads = 0

    async def serial_status(self, issuer: str, serial: str) -> SerialStatus:
        self.reads += 1
        return self.statuses.get(serial, SerialStatus(known=False))


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cache test CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return key, cert


@pytest.fixture
async def rig():
    key, cert = _ca()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    store, feed, clock = Store(), Feed(), Clock()
    cache = _cache(feed, clock, entries=100)
    await _synced(cache, clock)
    responder = OcspResponder(store=store, issuer=IssuerRecord(name="issuing-1", cert_pem=pem, chain_pem=pem,
                                                               key_id=b"k"),
                              signer_cert=cert, signer_key=key, validity_seconds=3600, clock=lambda: NOW, cache=cache)
    return responder, store, cache, cert


def _request(cert: x509.Certificate, serial: int, nonce: bytes | None = None,
             algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    probe = ocsp.OCSPRequestBuilder().add_certificate(cert, cert, algorithm or hashes.SHA1()).build()
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(probe.issuer_name_hash, probe.issuer_key_hash,
                                                                serial, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


async def test_responder_serves_good_from_the_cache_and_revoked_right_after_the_event(rig) -> None:
    responder, store, cache, cert = rig
    store.statuses["abc"] = SerialStatus(known=True)
    first = await responder.respond(_request(cert, 0xABC))
    assert (first.status, first.source, store.reads) == ("good", "produced", 1)
    again = await responder.respond(_request(cert, 0xABC))
    assert (again.status, again.source, again.der, store.reads) == ("good", "cache", first.der, 1)
    sha256 = await responder.respond(_request(cert, 0xABC, algorithm=hashes.SHA256()))
    parsed = ocsp.load_der_ocsp_response(sha256.der)
    assert isinstance(parsed.hash_algorithm, hashes.SHA256) and parsed.serial_number == 0xABC

    store.statuses["abc"] = SerialStatus(known=True, revoked_at=NOW, reason="key_compromise")
    cache.invalidate("abc")
    revoked = await responder.respond(_request(cert, 0xABC))
    parsed = ocsp.load_der_ocsp_response(revoked.der)
    assert revoked.source == "produced" and parsed.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert parsed.revocation_reason is x509.ReasonFlags.key_compromise
    assert (await responder.respond(_request(cert, 0xABC))).source == "cache"


async def test_responder_signs_nonce_requests_each_time_and_keeps_errors_out_of_the_cache(rig) -> None:
    responder, store, cache, cert = rig
    store.statuses["abc"] = SerialStatus(known=True)
    for nonce in (b"n1" * 8, b"n2" * 8):
        answer = await responder.respond(_request(cert, 0xABC, nonce=nonce))
        parsed = ocsp.load_der_ocsp_response(answer.der)
        assert answer.source == "nonce" and answer.signed is None
        assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert store.reads == 2 and len(cache) == 0
    unknown = await responder.respond(_request(cert, 0x1234))
    assert unknown.status == "unknown"
    assert (await responder.respond(b"garbage")).status == "malformedRequest"
    other_ca = _ca()[1]
    assert (await responder.respond(_request(other_ca, 0xABC))).status == "unauthorized"
    assert len(cache) == 1  # the unknown answer only


async def test_responder_ignores_nonces_when_told_to(rig) -> None:
    responder, store, cache, cert = rig
    responder._echo_nonce = False
    store.statuses["abc"] = SerialStatus(known=True)
    await responder.respond(_request(cert, 0xABC))
    answer = await responder.respond(_request(cert, 0xABC, nonce=b"x" * 16))
    assert answer.source == "cache" and store.reads == 1
    with pytest.raises(x509.ExtensionNotFound):
        ocsp.load_der_ocsp_response(answer.der).extensions.get_extension_for_class(x509.OCSPNonce)


async def test_responder_answers_try_later_when_untrusted_and_the_database_is_away(rig) -> None:
    responder, store, cache, cert = rig
    store.statuses["abc"] = SerialStatus(known=True)
    await responder.respond(_request(cert, 0xABC))
    cache._synced_at -= 10  # the last successful poll is old: the cached good answer is not used

    async def away(issuer: str, serial: str) -> SerialStatus:
        raise Unavailable("database away")

    store.serial_status = away  # type: ignore[method-assign]
    assert (await responder.respond(_request(cert, 0xABC))).status == "tryLater"
