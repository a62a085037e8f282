"""Revocation end to end on real NATS, MariaDB and SoftHSM: revoke (NATS, REST), full and delta CRLs, OCSP."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import urllib.parse
import uuid
from datetime import timedelta
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hapki.cara.config import CrlConfig
from hapki.cara.main import CaraRuntime
from hapki.cli.client import ClmClient
from hapki.clm.main import ClmRuntime
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode, FencedOut
from hapki.contracts.models import IssueReply, RevocationReason, RevokeCertificate, RevokeReply
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from integration.conftest import chain_files, connected_client, http_url, issue_server_certificate, query, running

pytestmark = pytest.mark.integration

LISTEN = "127.0.0.1:0"
PUBLIC_URL = "https://10.213.2.100"


class Rig:
    def __init__(self, cara: CaraRuntime, clm: ClmRuntime) -> None:
        self.cara, self.clm = cara, clm
        self.cara_url, self.clm_url = http_url(cara.http), http_url(clm.http)


def _cara_config(env: LocalEnv, member: str = "cara-1") -> Any:
    return stack.cara_config(env, member=member, http_listen=LISTEN, public_url=PUBLIC_URL,
                             crl=CrlConfig(poll_seconds=0.5))


@pytest.fixture(scope="module")
async def rig(env: LocalEnv) -> AsyncIterator[Rig]:
    async with running(_cara_config(env), stack.clm_config(env, wait_seconds=10.0, http_listen=LISTEN)) as pair:
        yield Rig(*pair)


@pytest.fixture
async def nats_client(env: LocalEnv, rig: Rig) -> AsyncIterator[ClmClient]:
    async with connected_client(env) as c:
        yield c


async def _issue(client: ClmClient, name: str) -> IssueReply:
    return await issue_server_certificate(client, name, "rev-tests")


def _revoke(serial: str, reason: str = "key_compromise", requester: str = "alice") -> RevokeCertificate:
    return RevokeCertificate(serial=serial, reason=RevocationReason(reason), requester=requester)


async def _crl(http: aiohttp.ClientSession, rig: Rig, suffix: str = ".crl") -> x509.CertificateRevocationList:
    async with http.get(f"{rig.cara_url}/crl/issuing-1{suffix}") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/pkix-crl"
        return x509.load_der_x509_crl(await resp.read())


def _serials(crl: x509.CertificateRevocationList) -> set[str]:
    return {format(r.serial_number, "x") for r in crl}


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


async def _wait_listed(http: aiohttp.ClientSession, rig: Rig, serial: str, timeout: float = 10.0) -> tuple[
        x509.CertificateRevocationList, float]:
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        crl = await _crl(http, rig)
        if serial in _serials(crl):
            return crl, loop.time() - began
        assert loop.time() - began < timeout, f"{serial} not on the CRL after {timeout} s"
        await asyncio.sleep(0.1)


# --- revoke ---

async def test_revoke_over_nats_is_idempotent_and_each_refusal_has_its_code(nats_client, sql) -> None:
    issued = await _issue(nats_client, "revoke-nats.example.com")
    first = await nats_client.revoke(_revoke(issued.serial))
    assert first.error is None, first.error
    assert (first.serial, first.issuer, first.reason, first.requester) == (
        issued.serial, "issuing-1", RevocationReason.KEY_COMPROMISE, "alice")
    # Same serial, same reason: the same result, the first requester and time kept.
    again = await nats_client.revoke(_revoke(issued.serial, requester="bob"))
    assert again == first
    other = await nats_client.revoke(_revoke(issued.serial, reason="superseded"))
    assert other.error is not None and other.error.code is ErrorCode.ALREADY_REVOKED
    assert other.error.details["reason"] == "key_compromise"
    unknown = await nats_client.revoke(_revoke("ab" * 19))
    assert unknown.error is not None and unknown.error.code is ErrorCode.NOT_FOUND
    fresh = await _issue(nats_client, "revoke-hold.example.com")
    for reason in ("certificate_hold", "remove_from_crl", "ca_compromise", "aa_compromise"):
        hold = await nats_client.revoke(_revoke(fresh.serial, reason=reason))
        assert hold.error is not None and hold.error.code is ErrorCode.FORBIDDEN_REASON, reason
    bad = RevokeReply.model_validate_json(await nats_client.raw(
        subjects.CLM_REVOKE, b'{"serial": "%s", "reason": "because", "requester": "x"}' % fresh.serial.encode()))
    assert bad.error is not None and bad.error.code is ErrorCode.MALFORMED_MESSAGE
    rows = await query(sql, "SELECT serial, reason, requester, request_id FROM revocations WHERE serial IN (%s, %s)",
                       (issued.serial, fresh.serial))
    assert rows == [(issued.serial, "key_compromise", "alice", issued.request_id)]


async def test_revoke_over_rest(nats_client, rig, http) -> None:
    issued = await _issue(nats_client, "revoke-rest.example.com")
    body = {"serial": issued.serial, "reason": "cessation_of_operation", "requester": "rest"}

    async def post(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with http.post(f"{rig.clm_url}/v1/revoke", json=payload) as resp:
            return resp.status, await resp.json()

    status, first = await post(body)
    assert status == 200 and first["reason"] == "cessation_of_operation" and first["issuer"] == "issuing-1", first
    assert await post(body) == (200, first)
    status, reply = await post({**body, "reason": "key_compromise"})
    assert (status, reply["error"]["code"]) == (409, "ALREADY_REVOKED")
    status, reply = await post({**body, "serial": "cd" * 19})
    assert (status, reply["error"]["code"]) == (404, "NOT_FOUND")
    status, reply = await post({**body, "reason": "certificate_hold"})
    assert (status, reply["error"]["code"]) == (422, "FORBIDDEN_REASON")
    status, reply = await post({**body, "reason": "nope"})
    assert (status, reply["error"]["code"]) == (400, "MALFORMED_MESSAGE")


# --- CRLs ---

async def test_certificates_carry_cdp_and_aia(nats_client) -> None:
    issued = await _issue(nats_client, "cdp.example.com")
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in cdp[0].full_name] == [f"{PUBLIC_URL}/crl/issuing-1.crl"]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (x509.AuthorityInformationAccessOID.OCSP, f"{PUBLIC_URL}/ocsp")]


async def test_crl_lists_a_revocation_within_seconds_and_openssl_agrees(nats_client, rig, http, tmp_path) -> None:
    good = await _issue(nats_client, "crl-good.example.com")
    bad = await _issue(nats_client, "crl-bad.example.com")
    assert (await nats_client.revoke(_revoke(bad.serial, "superseded"))).error is None
    crl, seconds = await _wait_listed(http, rig, bad.serial)
    print(f"revocation on the full CRL after {seconds:.2f} s")
    entry = crl.get_revoked_certificate_by_serial_number(int(bad.serial, 16))
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.superseded
    assert good.serial not in _serials(crl)
    assert crl.next_update_utc - crl.last_update_utc == x509_days(7)

    _, inter, root = chain_files(tmp_path, bad.certificate_pem, bad.chain_pem)
    chain = tmp_path / "chain.pem"
    chain.write_text(inter.read_text() + root.read_text())
    crl_pem = tmp_path / "crl.pem"
    crl_pem.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    delta = await _crl(http, rig, "-delta.crl")
    delta_pem = tmp_path / "delta.pem"
    delta_pem.write_bytes(delta.public_bytes(serialization.Encoding.PEM))
    for path in (crl_pem, delta_pem):
        result = subprocess.run(["openssl", "crl", "-in", str(path), "-noout", "-verify", "-CAfile", str(chain)],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "verify OK" in result.stdout + result.stderr, result.stdout + result.stderr

    def verify(reply: IssueReply) -> subprocess.CompletedProcess[str]:
        leaf = tmp_path / f"{reply.serial}.pem"
        leaf.write_text(reply.certificate_pem)
        return subprocess.run(["openssl", "verify", "-crl_check", "-CRLfile", str(crl_pem), "-CAfile", str(root),
                               "-untrusted", str(inter), str(leaf)], capture_output=True, text=True)

    revoked = verify(bad)
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    fine = verify(good)
    assert fine.returncode == 0, fine.stdout + fine.stderr


def x509_days(days: int) -> timedelta:
    return timedelta(days=days)


async def test_delta_crl_lists_exactly_the_revocations_since_its_base(nats_client, rig, http) -> None:
    cara = rig.cara
    certs = [await _issue(nats_client, f"delta{i}.example.com") for i in range(4)]
    await cara.signer.stop()  # the publisher idles while passive: this test decides when CRLs are made
    try:
        epoch = cara.signer.epoch
        assert (await nats_client.revoke(_revoke(certs[0].serial, "affiliation_changed"))).error is None
        base = await cara.crl.publish(epoch, delta=False)
        since = {c.serial: r for c, r in zip(certs[1:], ["key_compromise", "unspecified", "privilege_withdrawn"],
                                             strict=True)}
        for serial, reason in since.items():
            assert (await nats_client.revoke(_revoke(serial, reason))).error is None
        record = await cara.crl.publish(epoch, delta=True)
        delta = await _crl(http, rig, "-delta.crl")
        assert _number(delta) == record.number > base.number
        indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        assert indicator.critical and indicator.value.crl_number == base.number
        assert _serials(delta) == set(since)
        reasons = {format(r.serial_number, "x"): _reason(r) for r in delta}
        assert reasons == {s: (None if r == "unspecified" else r) for s, r in since.items()}
        full = await _crl(http, rig)
        assert _number(full) == base.number and certs[0].serial in _serials(full)
        assert not set(since) & _serials(full)
        # A new full CRL takes them in; a delta on it is empty.
        newer = await cara.crl.publish(epoch, delta=False)
        empty = await cara.crl.publish(epoch, delta=True)
        assert {c.serial for c in certs} <= _serials(await _crl(http, rig))
        assert empty.entries == 0 and empty.base == newer.number < empty.number
    finally:
        await cara.signer.start()


def _reason(entry: x509.RevokedCertificate) -> str | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
    except x509.ExtensionNotFound:
        return None


async def test_crl_numbers_strictly_increase_across_failovers(env, rig, sql) -> None:
    cara = rig.cara
    numbers: list[int] = []
    for _ in range(3):  # each restart bumps the epoch, as a failover does
        await cara.signer.stop()
        epoch = await cara.signer.start()
        numbers.append((await cara.crl.publish(epoch, delta=False)).number)
        numbers.append((await cara.crl.publish(epoch, delta=True)).number)
    other = CaraRuntime(_cara_config(env, member="cara-2"))
    try:
        stale = cara.signer.epoch
        new_epoch = await other.start()  # the other member takes over: a newer epoch
        assert new_epoch > stale
        numbers.append((await other.crl.publish(new_epoch, delta=False)).number)
        with pytest.raises(FencedOut):
            await cara.crl.publish(stale, delta=False)
        numbers.append((await other.crl.publish(new_epoch, delta=True)).number)
        # The passive member serves the CRLs too, from the database.
        async with aiohttp.ClientSession() as session, session.get(f"{rig.cara_url}/crl/issuing-1.crl") as resp:
            served = x509.load_der_x509_crl(await resp.read())
        assert _number(served) >= numbers[-2]
    finally:
        await other.stop()
        await cara.signer.stop()
        await cara.signer.start()
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    rows = await query(sql, "SELECT crl_number, epoch FROM crls WHERE issuer = 'issuing-1' ORDER BY crl_number")
    epochs = [e for _, e in rows]
    assert epochs == sorted(epochs), "a higher CRL number never comes from an older epoch"
    assert [n for n, _ in rows] == sorted({n for n, _ in rows}), "no duplicates"


async def test_a_crl_number_is_not_used_again_when_the_database_lost_the_newest_crls(rig, sql) -> None:
    """A restore from a backup (`hapki db restore`) takes the database back to before CRLs already published: the
    next CRL must still be numbered above them (RFC 5280 5.2.3), or a relying party holding the lost one would
    ignore it as older. Numbers follow the clock (revocation_store.next_crl_number), not max+1."""
    cara = rig.cara
    epoch = cara.signer.epoch
    assert epoch is not None
    lost = (await cara.crl.publish(epoch, delta=False)).number
    # What the backup did not hold: this CRL, and the stamps it put on revocations.
    await query(sql, "UPDATE revocations SET crl_number = NULL WHERE issuer = 'issuing-1' AND crl_number >= %s",
                (lost,))
    await query(sql, "DELETE FROM crls WHERE issuer = 'issuing-1' AND crl_number >= %s", (lost,))
    following = (await cara.crl.publish(epoch, delta=False)).number
    assert following > lost


# --- OCSP ---

def _ocsp_request(cert_pem: str, chain_pem: str, nonce: bytes | None = None, serial: int | None = None) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    issuer = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    builder = ocsp.OCSPRequestBuilder()
    if serial is None:
        builder = builder.add_certificate(cert, issuer, hashes.SHA1())
    else:
        probe = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        builder = builder.add_certificate_by_hash(probe.issuer_name_hash, probe.issuer_key_hash, serial, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


async def _ocsp_post(http: aiohttp.ClientSession, url: str, body: bytes) -> ocsp.OCSPResponse:
    async with http.post(f"{url}/ocsp", data=body, headers={"Content-Type": "application/ocsp-request"}) as resp:
        assert resp.status == 200 and resp.content_type == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(await resp.read())


async def _openssl_ocsp(tmp: Path, rig: Rig, reply: IssueReply) -> str:
    """`openssl ocsp` against the responder (a child process: the responder runs on this event loop)."""
    leaf, inter, root = chain_files(tmp, reply.certificate_pem, reply.chain_pem)
    chain = tmp / "chain.pem"
    chain.write_text(inter.read_text() + root.read_text())
    proc = await asyncio.create_subprocess_exec(
        "openssl", "ocsp", "-issuer", str(inter), "-cert", str(leaf), "-url", f"{rig.cara_url}/ocsp",
        "-CAfile", str(chain), "-resp_text", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    out = stdout.decode()
    assert proc.returncode == 0, out
    assert "Response verify OK" in out and "WARNING" not in out, out  # openssl warns when the nonce is missing
    return out


async def test_openssl_ocsp_reports_good_then_revoked(nats_client, rig, tmp_path) -> None:
    issued = await _issue(nats_client, "ocsp.example.com")
    out = await _openssl_ocsp(tmp_path, rig, issued)
    assert f"{tmp_path / 'leaf.pem'}: good" in out, out
    assert "OCSP Nonce" in out and "Next Update" in out
    assert (await nats_client.revoke(_revoke(issued.serial))).error is None
    out = await _openssl_ocsp(tmp_path, rig, issued)
    assert f"{tmp_path / 'leaf.pem'}: revoked" in out and "Reason: keyCompromise" in out, out


async def test_ocsp_post_get_nonce_unknown_and_malformed(env, nats_client, rig, http) -> None:
    issued = await _issue(nats_client, "ocsp-get.example.com")
    nonce = uuid.uuid4().bytes
    response = await _ocsp_post(http, rig.cara_url, _ocsp_request(issued.certificate_pem, issued.chain_pem, nonce))
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    signer = response.certificates[0]
    assert signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING])
    signer.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert response.next_update_utc - response.this_update_utc == x509_days(1) / 24

    encoded = urllib.parse.quote(base64.b64encode(_ocsp_request(issued.certificate_pem, issued.chain_pem)).decode(),
                                 safe="")
    async with http.get(f"{rig.cara_url}/ocsp/{encoded}") as resp:
        got = ocsp.load_der_ocsp_response(await resp.read())
    assert got.certificate_status is ocsp.OCSPCertStatus.GOOD
    with pytest.raises(x509.ExtensionNotFound):
        got.extensions.get_extension_for_class(x509.OCSPNonce)

    unknown = await _ocsp_post(http, rig.cara_url, _ocsp_request(issued.certificate_pem, issued.chain_pem,
                                                                  serial=0x1234567))
    assert unknown.certificate_status is ocsp.OCSPCertStatus.UNKNOWN

    for garbage in (b"", b"garbage", b"\x30\x03\x02\x01\x01", b"\x00" * 70000):
        bad = await _ocsp_post(http, rig.cara_url, garbage)
        assert bad.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST, garbage[:10]
    async with http.get(f"{rig.cara_url}/ocsp/not%base64!!") as resp:
        assert resp.status == 200
        assert ocsp.load_der_ocsp_response(await resp.read()).response_status is (
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST)

    # A passive member (opened, never started: it signs nothing) answers OCSP too.
    passive = CaraRuntime(_cara_config(env, member="cara-3"))
    await passive.open()
    try:
        assert not passive.signer.active
        response = await _ocsp_post(http, http_url(passive.http), _ocsp_request(issued.certificate_pem, issued.chain_pem))
        assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    finally:
        await passive.stop()


# --- OCSP from the cache (hapki.cara.ocsp_cache) ---

def _get_path(request_der: bytes) -> str:
    return "/ocsp/" + urllib.parse.quote(base64.b64encode(request_der).decode(), safe="")


async def _ocsp_get(http: aiohttp.ClientSession, url: str, request_der: bytes) -> tuple[ocsp.OCSPResponse, Any]:
    async with http.get(url + _get_path(request_der)) as resp:
        assert resp.status == 200 and resp.content_type == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(await resp.read()), resp.headers


async def test_ocsp_get_answers_come_from_the_cache_with_caching_headers(nats_client, rig, http) -> None:
    issued = await _issue(nats_client, "ocsp-cache.example.com")
    request = _ocsp_request(issued.certificate_pem, issued.chain_pem)
    first, headers = await _ocsp_get(http, rig.cara_url, request)
    assert first.certificate_status is ocsp.OCSPCertStatus.GOOD and headers["X-Hapki-Ocsp-Source"] == "produced"
    assert headers["Cache-Control"] == "max-age=5, public, no-transform, must-revalidate"
    assert headers["ETag"] and headers["Last-Modified"]
    again, headers = await _ocsp_get(http, rig.cara_url, request)
    assert headers["X-Hapki-Ocsp-Source"] == "cache"
    assert again.public_bytes(serialization.Encoding.DER) == first.public_bytes(serialization.Encoding.DER)
    # POST of the same question: the same cached response; with a nonce: signed for it, never stored.
    posted = await _ocsp_post(http, rig.cara_url, request)
    assert posted.public_bytes(serialization.Encoding.DER) == first.public_bytes(serialization.Encoding.DER)
    nonce = uuid.uuid4().bytes
    async with http.get(rig.cara_url + _get_path(_ocsp_request(issued.certificate_pem, issued.chain_pem,
                                                                nonce))) as resp:
        assert resp.headers["Cache-Control"] == "no-store" and resp.headers["X-Hapki-Ocsp-Source"] == "nonce"
        with_nonce = ocsp.load_der_ocsp_response(await resp.read())
    assert with_nonce.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    # Errors are never cacheable.
    async with http.get(f"{rig.cara_url}/ocsp/not%base64!!") as resp:
        assert resp.headers["Cache-Control"] == "no-store"


async def test_a_revocation_makes_the_next_ocsp_answer_revoked_on_every_member(env, nats_client, rig, http) -> None:
    """The event drops the cached `good` on the active and on a passive member at once (no poll needed)."""
    passive = CaraRuntime(_cara_config(env, member="cara-4"))
    await passive.open()
    try:
        issued = await _issue(nats_client, "ocsp-revoke-cache.example.com")
        request = _ocsp_request(issued.certificate_pem, issued.chain_pem)
        urls = (rig.cara_url, http_url(passive.http))
        for url in urls:
            for _ in range(2):
                answer, headers = await _ocsp_get(http, url, request)
                assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
            assert headers["X-Hapki-Ocsp-Source"] == "cache"
        # No polls from here on (one now, so the cache stays trusted for its staleness bound): only the event can
        # explain an answer that says revoked.
        for member in (rig.cara, passive):
            _cache_poll(member).cancel()
            await member.ocsp_cache.sync()
        began = asyncio.get_running_loop().time()
        assert (await nats_client.revoke(_revoke(issued.serial, "key_compromise"))).error is None
        for url in urls:
            while True:
                answer, headers = await _ocsp_get(http, url, request)
                if answer.certificate_status is ocsp.OCSPCertStatus.REVOKED:
                    break
                assert asyncio.get_running_loop().time() - began < 1.0, f"{url} still says good"
                await asyncio.sleep(0.01)
            assert answer.revocation_reason is x509.ReasonFlags.key_compromise
        print(f"revoked on both members after {asyncio.get_running_loop().time() - began:.3f} s")
    finally:
        await passive.stop()
        served = rig.cara.issuers.served[rig.cara.issuers.signing]
        served.cache_task = asyncio.create_task(served.cache.run())
        served.tasks.append(served.cache_task)


def _cache_poll(cara: CaraRuntime) -> asyncio.Task[None]:
    """The revocation poll of the OCSP cache of the issuing CA `cara` issues from."""
    assert cara.issuers is not None
    task = cara.issuers.served[cara.issuers.signing].cache_task
    assert task is not None
    return task


async def test_a_revocation_without_its_event_is_seen_within_the_staleness_bound(nats_client, rig, http, sql) -> None:
    """The poll is the backstop of the event (core NATS, at most once): a revocations row nobody announced."""
    issued = await _issue(nats_client, "ocsp-revoke-silent.example.com")
    request = _ocsp_request(issued.certificate_pem, issued.chain_pem)
    for _ in range(2):
        answer, headers = await _ocsp_get(http, rig.cara_url, request)
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD and headers["X-Hapki-Ocsp-Source"] == "cache"
    async with sql.cursor() as cur:
        await cur.execute("INSERT INTO revocations (issuer, serial, reason, revoked_at, requester) VALUES"
                          " ('issuing-1', %s, 'superseded', UTC_TIMESTAMP(6), 'silent')", (issued.serial,))
    await sql.commit()
    began = asyncio.get_running_loop().time()
    bound = rig.cara.config.ocsp.max_staleness_seconds
    while True:
        answer, _ = await _ocsp_get(http, rig.cara_url, request)
        if answer.certificate_status is ocsp.OCSPCertStatus.REVOKED:
            break
        assert asyncio.get_running_loop().time() - began < bound, "a cached good outlived the staleness bound"
        await asyncio.sleep(0.05)
    print(f"silent revocation seen after {asyncio.get_running_loop().time() - began:.2f} s (bound {bound} s)")


async def test_cached_answers_stop_when_revocations_cannot_be_read(nats_client, rig, http, monkeypatch) -> None:
    """A member that cannot poll (database away) stops serving cached answers after the staleness bound."""
    issued = await _issue(nats_client, "ocsp-untrusted.example.com")
    request = _ocsp_request(issued.certificate_pem, issued.chain_pem)
    for _ in range(2):
        _, headers = await _ocsp_get(http, rig.cara_url, request)
    assert headers["X-Hapki-Ocsp-Source"] == "cache"
    cache = rig.cara.ocsp_cache
    cache._synced_at -= rig.cara.config.ocsp.max_staleness_seconds + 1  # as if the polls had failed since
    monkeypatch.setattr(cache, "sync", _never_synced)
    answer, headers = await _ocsp_get(http, rig.cara_url, request)
    assert headers["X-Hapki-Ocsp-Source"] == "produced"  # a live read and signature, not the cached answer
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    monkeypatch.undo()
    await cache.sync()


async def _never_synced() -> None:
    from hapki.contracts.errors import Unavailable

    raise Unavailable("database away (test)")
