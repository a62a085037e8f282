"""Revocation through the HA lab: OCSP and CRLs on the CARA VIP (plain HTTP, the URLs certificates name), checked
with openssl; CRL numbers across forced failovers; OCSP while the active CARA member is crashed."""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID
from hapki.cara.config import OcspConfig
from hapki.cli.client import ClmClient, new_key_and_csr
from hapki.contracts.models import IssueCertificate, IssueReply, RevocationReason, RevokeCertificate
from hapki.lab.ha import Lab
from hapki.lab.load import connect_db, crash_member
from helpers.openssl import openssl_ocsp, reply_files

pytestmark = pytest.mark.lab

# OCSP probes while the active member is crashed: each attempt waits this long before the client tries again.
OCSP_ATTEMPT_SECONDS = 0.3
OCSP_ANSWER_BOUND = 1.0  # seconds from a probe's first send to its verified answer, whatever the fault


async def _issue(lab: Lab, name: str) -> IssueReply:
    client = await ClmClient.connect(lab.client_nats_config(), timeout=10.0)
    try:
        reply = await client.issue(IssueCertificate(csr_pem=new_key_and_csr([name])[0].decode(), profile="tls-server",
                                                    requester="lab-revocation"))
    finally:
        await client.close()
    assert reply.serial is not None, reply
    return reply


async def _revoke(lab: Lab, serial: str) -> None:
    client = await ClmClient.connect(lab.client_nats_config(), timeout=10.0)
    try:
        reply = await client.revoke(RevokeCertificate(serial=serial, reason=RevocationReason.KEY_COMPROMISE,
                                                      requester="lab-revocation"))
    finally:
        await client.close()
    assert reply.error is None, reply


def _urls(reply: IssueReply) -> tuple[str, str]:
    """The certificate's own OCSP (AIA) and CRL (CDP) URLs."""
    cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    ocsp_url = next(d.access_location.value for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP)
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return ocsp_url, cdp[0].full_name[0].value


def _files(tmp: Path, reply: IssueReply) -> tuple[Path, Path, Path]:
    assert reply.serial and reply.certificate_pem and reply.chain_pem
    return reply_files(tmp, reply.serial, reply.certificate_pem, reply.chain_pem)


def _openssl_ocsp(tmp: Path, reply: IssueReply, url: str) -> str:
    assert reply.serial and reply.certificate_pem and reply.chain_pem
    return openssl_ocsp(tmp, reply.serial, reply.certificate_pem, reply.chain_pem, url)


def _crl_listing(url: str, serial: str, timeout: float = 15.0) -> bytes:
    """The CRL at `url` once it lists `serial` (CARA regenerates within seconds of a revocation)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the lab's own VIP
            der = response.read()
        crl = x509.load_der_x509_crl(der)
        if crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None:
            return der
        assert time.monotonic() < deadline, f"{serial} not on {url} after {timeout:.0f} s"
        time.sleep(0.3)


def test_ocsp_and_crl_on_the_cara_vip_agree_with_openssl(lab: Lab, tmp_path: Path) -> None:
    reply = asyncio.run(_issue(lab, "vip-ocsp.example.com"))
    ocsp_url, crl_url = _urls(reply)
    assert ocsp_url == f"{lab.plain_url('cara')}/ocsp" and crl_url.startswith(f"{lab.plain_url('cara')}/crl/")

    assert f"{reply.serial.upper()}" in _openssl_ocsp(tmp_path, reply, ocsp_url).upper()
    assert ": good" in _openssl_ocsp(tmp_path, reply, ocsp_url)
    asyncio.run(_revoke(lab, reply.serial))
    assert ": revoked" in _openssl_ocsp(tmp_path, reply, ocsp_url)

    crl_pem = tmp_path / "crl.pem"
    crl_pem.write_bytes(x509.load_der_x509_crl(_crl_listing(crl_url, reply.serial)).public_bytes(
        serialization.Encoding.PEM))
    leaf, issuer, chain = _files(tmp_path, reply)
    checked = subprocess.run(["openssl", "crl", "-in", str(crl_pem), "-noout", "-verify", "-CAfile", str(chain)],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked
    verdict = subprocess.run(["openssl", "verify", "-crl_check", "-CRLfile", str(crl_pem), "-CAfile", str(chain),
                              str(leaf)], capture_output=True, text=True)
    assert verdict.returncode != 0 and "certificate revoked" in verdict.stdout + verdict.stderr, verdict
    # Only the HTTP paths of revocation status are served in the clear.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{lab.plain_url('cara')}/health", timeout=5)  # noqa: S310
    assert refused.value.code == 404


async def _probe(http: aiohttp.ClientSession, url: str, body: bytes) -> float:
    """Seconds until a verified, successful OCSP answer, retrying each OCSP_ATTEMPT_SECONDS."""
    began = time.monotonic()
    while time.monotonic() - began < 10.0:
        try:
            async with http.post(url, data=body, headers={"Content-Type": "application/ocsp-request"},
                                 timeout=aiohttp.ClientTimeout(total=OCSP_ATTEMPT_SECONDS)) as response:
                answer = ocsp.load_der_ocsp_response(await response.read())
            if answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL:
                assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
                return time.monotonic() - began
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        await asyncio.sleep(0.02)
    return float("inf")


def test_ocsp_answers_within_a_second_while_the_active_cara_member_is_crashed(lab: Lab, timing) -> None:
    reply = asyncio.run(_issue(lab, "vip-ocsp-crash.example.com"))
    ocsp_url, _ = _urls(reply)
    cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    issuer = x509.load_pem_x509_certificates(reply.chain_pem.encode())[0]
    body = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER)
    active = lab.vip_holders("cara")[0]

    async def run() -> list[float]:
        async with aiohttp.ClientSession() as http:
            assert await _probe(http, ocsp_url, body) < OCSP_ANSWER_BOUND  # healthy first
            probes = []
            crash_member(lab, active)
            for _ in range(40):  # a probe every 50 ms for the 2 s after the crash
                probes.append(asyncio.create_task(_probe(http, ocsp_url, body)))
                await asyncio.sleep(0.05)
            return list(await asyncio.gather(*probes))

    answered = asyncio.run(run())
    timing("cara.crash.ocsp_worst_answer", max(answered))
    assert lab.vip_holders("cara") and lab.vip_holders("cara") != [active]
    assert max(answered) < OCSP_ANSWER_BOUND, answered


def test_crl_numbers_strictly_increase_across_forced_failovers(lab: Lab) -> None:
    async def numbers() -> list[tuple[str, int, str]]:
        conn = await connect_db(lab)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT issuer, crl_number, member FROM crls ORDER BY created_at, crl_number")
                return [(i, n, m) for i, n, m in await cur.fetchall()]
        finally:
            conn.close()

    def revoke_one(name: str) -> None:
        reply = asyncio.run(_issue(lab, name))
        asyncio.run(_revoke(lab, reply.serial))
        _crl_listing(_urls(reply)[1], reply.serial)  # a new CRL, by the member active now

    revoke_one("crl-failover-start.example.com")
    for round_ in range(2):
        active = lab.vip_holders("cara")[0]
        crash_member(lab, active)
        deadline = time.monotonic() + 10
        while lab.vip_holders("cara") in ([], [active]):
            assert time.monotonic() < deadline, "the CARA VIP did not move"
            time.sleep(0.05)
        revoke_one(f"crl-failover-{round_}.example.com")  # signed by the member that took over
        lab.heal()  # the crashed member comes back (preferred, it takes the VIP back)
        lab.wait_steady(90)
    revoke_one("crl-failover-end.example.com")
    rows = asyncio.run(numbers())
    # One number sequence per issuer (RFC 5280 5.2.3; the lab may serve several after a rollover test): each in
    # commit order strictly increasing.
    for issuer in {i for i, _, _ in rows}:
        sequence = [n for i, n, _ in rows if i == issuer]
        assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence), (issuer, rows)
    assert len({m for _, _, m in rows if m != "ceremony"}) == 2, f"both members should have signed CRLs: {rows}"


def _vip_get(lab: Lab, request_der: bytes) -> tuple[ocsp.OCSPResponse, Any]:
    """GET /ocsp/<base64> on the CARA VIP over TLS (haproxy); (the answer, the response headers)."""
    path = "/ocsp/" + urllib.parse.quote(base64.b64encode(request_der).decode(), safe="")
    context = ssl.create_default_context(cafile=str(lab.ca_bundle))
    with urllib.request.urlopen(lab.url("cara") + path, timeout=5, context=context) as response:  # noqa: S310
        return ocsp.load_der_ocsp_response(response.read()), response.headers


def test_ocsp_gets_through_the_vip_come_from_haproxy_and_a_revocation_shows_within_the_bound(lab: Lab,
                                                                                            timing) -> None:
    """haproxy caches GET answers (an Age header marks them); a revocation reaches every client of the VIP within
    the stated bound (CARA's staleness bound + haproxy's max-age), and POSTs (never cached by haproxy) at once."""
    reply = asyncio.run(_issue(lab, "vip-ocsp-cache.example.com"))
    cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    issuer = x509.load_pem_x509_certificates(reply.chain_pem.encode())[0]
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER)
    first, headers = _vip_get(lab, request)
    assert first.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert "max-age=5" in headers["Cache-Control"]
    _, headers = _vip_get(lab, request)
    assert headers.get("Age") is not None, dict(headers)  # answered by haproxy's cache

    asyncio.run(_revoke(lab, reply.serial))
    began = time.monotonic()
    ocsp_url, _ = _urls(reply)

    async def posted() -> ocsp.OCSPResponse:
        async with aiohttp.ClientSession() as http, http.post(
                ocsp_url, data=request, headers={"Content-Type": "application/ocsp-request"}) as response:
            return ocsp.load_der_ocsp_response(await response.read())

    assert asyncio.run(posted()).certificate_status is ocsp.OCSPCertStatus.REVOKED  # CARA's memory: event
    timing("cara.ocsp.revoked_on_post", time.monotonic() - began)
    bound = OcspConfig().revocation_bound_seconds
    while True:
        answer, _ = _vip_get(lab, request)
        if answer.certificate_status is ocsp.OCSPCertStatus.REVOKED:
            break
        assert time.monotonic() - began < bound, f"the VIP still answers good {bound} s after the revocation"
        time.sleep(0.1)
    timing("cara.ocsp.revoked_on_vip_get", time.monotonic() - began)
    assert answer.revocation_reason is x509.ReasonFlags.key_compromise


def test_ocsp_gets_through_the_vip_stay_correct_across_a_failover(lab: Lab, timing) -> None:
    """The member that takes the VIP answers from its own haproxy and CARA caches: good stays good, and a
    certificate revoked while the other member was active is revoked there too."""
    good = asyncio.run(_issue(lab, "vip-ocsp-failover-good.example.com"))
    bad = asyncio.run(_issue(lab, "vip-ocsp-failover-bad.example.com"))
    requests = {}
    for reply in (good, bad):
        cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
        issuer = x509.load_pem_x509_certificates(reply.chain_pem.encode())[0]
        requests[reply.serial] = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build(
        ).public_bytes(serialization.Encoding.DER)
        assert _vip_get(lab, requests[reply.serial])[0].certificate_status is ocsp.OCSPCertStatus.GOOD
    asyncio.run(_revoke(lab, bad.serial))
    active = lab.vip_holders("cara")[0]
    crash_member(lab, active)
    began = time.monotonic()
    while True:
        try:
            answers = {s: _vip_get(lab, r)[0].certificate_status for s, r in requests.items()}
            break
        except (urllib.error.URLError, OSError):
            assert time.monotonic() - began < 10, "no OCSP answer on the VIP 10 s after the crash"
            time.sleep(0.05)
    timing("cara.crash.ocsp_get_answer", time.monotonic() - began)
    assert lab.vip_holders("cara") and lab.vip_holders("cara") != [active]
    assert answers == {good.serial: ocsp.OCSPCertStatus.GOOD, bad.serial: ocsp.OCSPCertStatus.REVOKED}
