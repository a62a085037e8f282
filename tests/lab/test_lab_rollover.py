"""`hapki ca rollover` on the HA lab: both CARA members switch to the new issuing CA (the passive one too, as
Prometheus shows), a failover hands signing to the other member, which issues from the new CA under its own epoch,
and the CA before still answers OCSP (verified by openssl) and lists a revocation on its CRL through the VIP.
The lab keeps the new CA as its default afterwards; nothing in the other lab tests names an issuer."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hapki.cli.client import ClmClient, new_key_and_csr
from hapki.contracts.models import IssueCertificate, IssueReply, RevocationReason, RevokeCertificate
from hapki.lab.cluster import wait_until
from hapki.lab.ha import Lab
from hapki.lab.load import connect_db
from hapki.runtime import invariants
from helpers.openssl import openssl_ocsp

pytestmark = pytest.mark.lab

SWITCH_WAIT = 30.0  # issuers_check_seconds (10) + a few scrapes (2 s)
FAILOVER_WAIT = 15.0


def _issuing_ca_series(lab: Lab) -> dict[str, str]:
    """member -> the issuing CA it issues from, as Prometheus last scraped it."""
    query = urllib.parse.urlencode({"query": 'hapki_ca_certificate_remaining_seconds{pki_certificate="issuing_ca"}'})
    with urllib.request.urlopen(f"{lab.prometheus_url}/api/v1/query?{query}", timeout=5) as response:
        body = json.loads(response.read())
    return {s["metric"]["pki_member"]: s["metric"]["pki_issuer"] for s in body["data"]["result"]}


async def _client(lab: Lab) -> ClmClient:
    return await ClmClient.connect(lab.client_nats_config(), timeout=10.0)


async def _issue(lab: Lab, name: str) -> IssueReply:
    client = await _client(lab)
    try:
        reply = await client.issue(IssueCertificate(csr_pem=new_key_and_csr([name])[0].decode(), profile="tls-server",
                                                    requester="lab-rollover"))
    finally:
        await client.close()
    assert reply.serial is not None and reply.chain_pem is not None, reply
    return reply


def _chain(reply: IssueReply) -> list[x509.Certificate]:
    assert reply.certificate_pem is not None and reply.chain_pem is not None
    return [x509.load_pem_x509_certificate(reply.certificate_pem.encode()),
            *x509.load_pem_x509_certificates(reply.chain_pem.encode())]


def _openssl_ocsp(tmp: Path, reply: IssueReply, url: str) -> str:
    """openssl's check of the certificate's status at the CARA VIP, the response verified under its chain."""
    assert reply.serial and reply.certificate_pem and reply.chain_pem
    return openssl_ocsp(tmp, reply.serial, reply.certificate_pem, reply.chain_pem, url)


def _crl(lab: Lab, issuer: str) -> x509.CertificateRevocationList:
    base = lab.plain_url("cara")
    assert base is not None
    with urllib.request.urlopen(f"{base}/crl/{issuer}.crl", timeout=5) as response:
        return x509.load_der_x509_crl(response.read())


def test_a_rollover_reaches_both_members_and_survives_a_failover(lab: Lab, tmp_path: Path) -> None:
    before = asyncio.run(_issue(lab, "before-rollover.lab.example.com"))
    old_cert, old_ca, root = _chain(before)
    members = lab.topo.members_of_tier("cara")
    holder = lab.vip_holders("cara")[0]
    other = next(m for m in members if m != holder)
    assert wait_until(lambda: set(_issuing_ca_series(lab)) == set(members), SWITCH_WAIT, 0.5) is not None, (
        _issuing_ca_series(lab))  # scraped (a lab just up may not be yet)
    names = _issuing_ca_series(lab)
    assert len(set(names.values())) == 1, names
    old_name = next(iter(names.values()))

    done = lab.ca("rollover")

    assert done.returncode == 0, done.stdout + done.stderr
    new_name = done.stdout.split("issuer '", 1)[1].split("'", 1)[0]
    assert new_name != old_name and f"(it was '{old_name}')" in done.stdout, done.stdout
    # Both members switch, the passive one too: the metric names the CA each issues from.
    switched = wait_until(lambda: set(_issuing_ca_series(lab).values()) == {new_name}, SWITCH_WAIT, 0.5)
    assert switched is not None, _issuing_ca_series(lab)

    after = asyncio.run(_issue(lab, "after-rollover.lab.example.com"))
    cert, new_ca, new_root = _chain(after)
    cert.verify_directly_issued_by(new_ca)
    new_ca.verify_directly_issued_by(root)
    assert new_root == root and new_ca != old_ca

    # The other member takes over signing (keepalived stopped on the holder) and issues from the new CA too.
    lab.stop(f"keepalived@{holder}")
    assert lab.wait_vip("cara", other, FAILOVER_WAIT) is not None, lab.vip_holders("cara")
    later = asyncio.run(_issue(lab, "after-failover.lab.example.com"))
    later_cert, later_ca, _ = _chain(later)
    assert later_ca == new_ca
    later_cert.verify_directly_issued_by(new_ca)

    # The CA before answers for what it issued, through the VIP, from the member that holds it now.
    ocsp_url = f"{lab.plain_url('cara')}/ocsp"
    assert ": good" in _openssl_ocsp(tmp_path, before, ocsp_url)
    assert ": good" in _openssl_ocsp(tmp_path, later, ocsp_url)
    revoke = asyncio.run(_revoke(lab, before.serial or ""))
    assert revoke is None

    def listed() -> bool:
        return _crl(lab, old_name).get_revoked_certificate_by_serial_number(old_cert.serial_number) is not None

    assert wait_until(listed, 15.0, 0.2) is not None, "the revocation is not on the old CA's CRL"
    assert _crl(lab, old_name).is_signature_valid(old_ca.public_key())
    assert _crl(lab, new_name).is_signature_valid(new_ca.public_key())
    assert ": revoked" in _openssl_ocsp(tmp_path, before, ocsp_url)

    # Nothing signed that is not accounted for, across the switch and the failover.
    async def check() -> dict[str, list[tuple[Any, ...]]]:
        conn = await connect_db(lab)
        try:
            return await invariants.violations(conn, quiet=False)
        finally:
            conn.close()

    assert asyncio.run(check()) == {name: [] for name in invariants.CHECKS if name not in invariants.QUIET_ONLY}


async def _revoke(lab: Lab, serial: str) -> Any:
    client = await _client(lab)
    try:
        reply = await client.revoke(RevokeCertificate(serial=serial, reason=RevocationReason.KEY_COMPROMISE,
                                                      requester="lab-rollover"))
    finally:
        await client.close()
    return reply.error
