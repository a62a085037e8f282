"""`hapki ca rollover` on real NATS, MariaDB and SoftHSM: a new issuing CA under the same root becomes the default
while CARA runs (two signer processes), new certificates come from it, and the CA before keeps answering OCSP and
publishing CRLs for what it issued."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from hapki.cara.config import CrlConfig, SignerConfig
from hapki.cara.main import CaraRuntime
from hapki.cli.client import ClmClient
from hapki.clm.main import ClmRuntime
from hapki.contracts.models import IssueReply, RevocationReason, RevokeCertificate
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime import invariants
from helpers.certs import self_signed_ca
from integration.conftest import connected_client, http_url, issue_server_certificate, query, running

pytestmark = pytest.mark.integration

LISTEN = "127.0.0.1:0"
PUBLIC_URL = "https://10.213.2.100"


def _config(env: LocalEnv) -> Any:
    # Two signer processes: the worker must switch too. Small batches, one at a time: both processes sign.
    return stack.cara_config(env, http_listen=LISTEN, public_url=PUBLIC_URL, crl=CrlConfig(poll_seconds=0.5),
                             issuers_check_seconds=0.5,
                             signer=SignerConfig(processes=2, batch=2, batches_in_flight=1))


@pytest.fixture(scope="module")
async def rig(env: LocalEnv) -> AsyncIterator[tuple[CaraRuntime, ClmRuntime]]:
    async with running(_config(env), stack.clm_config(env, wait_seconds=20.0)) as pair:
        yield pair


@pytest.fixture
async def client(env: LocalEnv, rig: object) -> AsyncIterator[ClmClient]:
    async with connected_client(env) as c:
        yield c


async def _issue(client: ClmClient, name: str) -> IssueReply:
    return await issue_server_certificate(client, name, "rollover-tests")


def _rollover(env: LocalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    config = stack.write_config(_config(env), env.base_dir / "cara-rollover.toml")
    return subprocess.run([*stack.hapki_command(), "ca", "rollover", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def _chain(reply: IssueReply) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(reply.certificate_pem.encode()),
            *x509.load_pem_x509_certificates(reply.chain_pem.encode())]


async def _ocsp(http: aiohttp.ClientSession, cara: CaraRuntime, reply: IssueReply) -> ocsp.OCSPResponse:
    cert, issuer = _chain(reply)[:2]
    der = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build().public_bytes(Encoding.DER)
    async with http.post(f"{http_url(cara.http)}/ocsp", data=der,
                         headers={"Content-Type": "application/ocsp-request"}) as resp:
        assert resp.status == 200
        return ocsp.load_der_ocsp_response(await resp.read())


def _verified_by(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    """The responder certificate of a successful response, checked: issued by `issuer`, and it signed the response."""
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    [responder] = response.certificates
    responder.verify_directly_issued_by(issuer)
    public_key = responder.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(response.signature_hash_algorithm))
    return responder


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


async def _crl(http: aiohttp.ClientSession, cara: CaraRuntime, issuer: str) -> x509.CertificateRevocationList:
    async with http.get(f"{http_url(cara.http)}/crl/{issuer}.crl") as resp:
        assert resp.status == 200, await resp.text()
        return x509.load_der_x509_crl(await resp.read())


async def test_rollover_issues_from_the_new_ca_and_the_old_one_keeps_answering(env, rig, client, http, sql) -> None:
    cara, _ = rig
    assert cara.signers is not None and cara.issuers is not None
    await _until(lambda: all(slot.state == "active" for slot in cara.signers.workers), 30, "the worker active")
    before = await _issue(client, "before-rollover.example.com")
    old_cert, old_ca, root = _chain(before)
    assert cara.issuers.signing == "issuing-1"

    done = _rollover(env)

    assert done.returncode == 0, done.stderr
    assert "'issuing-2' is the default from now on (it was 'issuing-1')" in done.stdout, done.stdout
    assert "unusable" not in done.stderr, done.stderr  # the HSM's C_Initialize left the TLS connections alone
    await _until(lambda: cara.issuers.signing == "issuing-2", 10, "the member issues from issuing-2")
    # Every process of the member issues from the new CA: the worker too (it reports its signatures).
    worker = cara.signers.workers[0]
    signed_by_worker = worker.total_signatures
    after = [await _issue(client, f"after-rollover-{i}.example.com") for i in range(12)]
    await _until(lambda: worker.total_signatures > signed_by_worker, 10, "the worker signed some")
    for reply in after:
        cert, new_ca, new_root = _chain(reply)
        cert.verify_directly_issued_by(new_ca)
        new_ca.verify_directly_issued_by(root)  # the same root: relying parties need nothing new
        assert new_root == root and new_ca != old_ca and new_ca.subject != old_ca.subject
        assert new_ca.public_key() != old_ca.public_key()
        [point] = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert point.full_name == [x509.UniformResourceIdentifier(f"{PUBLIC_URL}/crl/issuing-2.crl")]
    rows = await query(sql, "SELECT issuer, COUNT(*) FROM certificates WHERE request_id IN (SELECT id FROM requests"
                            " WHERE requester = 'rollover-tests') GROUP BY issuer ORDER BY issuer")
    assert rows == [("issuing-1", 1), ("issuing-2", 12)]

    # OCSP: each certificate is answered under its own CA's responder.
    old_answer = await _ocsp(http, cara, before)
    assert old_answer.certificate_status is ocsp.OCSPCertStatus.GOOD and old_answer.serial_number == old_cert.serial_number
    _verified_by(old_answer, old_ca)
    new_answer = await _ocsp(http, cara, after[0])
    assert new_answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    _verified_by(new_answer, _chain(after[0])[1])

    # A revocation of what the old CA issued reaches the old CA's CRL and OCSP; the new CA publishes its own.
    revoked = await client.revoke(RevokeCertificate(serial=before.serial, reason=RevocationReason("key_compromise"),
                                                    requester="alice"))
    assert revoked.error is None, revoked
    deadline = time.monotonic() + 15
    while (crl := await _crl(http, cara, "issuing-1")).get_revoked_certificate_by_serial_number(
            old_cert.serial_number) is None:
        assert time.monotonic() < deadline, "the old CA's CRL does not list the revocation"
        await asyncio.sleep(0.2)
    assert crl.is_signature_valid(old_ca.public_key())
    new_crl = await _crl(http, cara, "issuing-2")
    assert new_crl.is_signature_valid(_chain(after[0])[1].public_key()) and len(new_crl) == 0
    assert (await _ocsp(http, cara, before)).certificate_status is ocsp.OCSPCertStatus.REVOKED

    # Audited: the new CA, its signers, and the switch naming the CA before.
    kinds = await query(sql, "SELECT kind, detail FROM audit_entries WHERE issuer = 'issuing-2' ORDER BY created_at, id")
    assert [k for k, _ in kinds][:1] == ["issuer.created"] and "issuer.default" in [k for k, _ in kinds]
    assert '"replaces":"issuing-1"' in dict(kinds)["issuer.default"]
    assert {k for k, _ in kinds} >= {"ocsp_signer.created", "audit_signer.created"}


async def test_requests_in_flight_during_a_rollover_are_each_signed_and_stored_as_one_issuer(env, rig, client,
                                                                                             sql) -> None:
    """Batches under way when the signer switches finish as the issuer they started with: every certificate's row,
    its intent and its signature name the same CA, whichever process signed it."""
    cara, _ = rig
    assert cara.issuers is not None
    replies: list[IssueReply] = []
    stop = asyncio.Event()

    async def load() -> None:  # waves of 8 concurrent requests, from before the rollover to after the switch
        wave = 0
        while not stop.is_set() and wave < 400:
            wave += 1
            replies.extend(await asyncio.gather(*(_issue(client, f"in-flight-{wave}-{i}.example.com")
                                                  for i in range(8))))

    loading = asyncio.create_task(load())
    done = await asyncio.to_thread(_rollover, env)
    assert done.returncode == 0, done.stderr
    await _until(lambda: cara.issuers.signing == "issuing-3", 10, "the member issues from issuing-3")
    await asyncio.sleep(0.5)
    stop.set()
    await loading
    replies.append(await _issue(client, "after-second-rollover.example.com"))

    cas = {name: x509.load_pem_x509_certificate(pem.encode())
           for name, pem in await query(sql, "SELECT name, cert_pem FROM issuers")}
    rows = await query(sql, "SELECT c.issuer, i.issuer, c.cert_pem, c.serial FROM certificates c"
                            " JOIN signing_intents i ON i.id = c.intent_id")
    for stored_as, intent_issuer, pem, serial in rows:
        assert intent_issuer == stored_as, serial
        x509.load_pem_x509_certificate(pem.encode()).verify_directly_issued_by(cas[stored_as])
    by_serial = {serial: issuer for issuer, _, _, serial in rows}
    for reply in replies:  # the chain each client got is its certificate's issuer's
        cert, ca = _chain(reply)[:2]
        cert.verify_directly_issued_by(ca)
        assert ca == cas[by_serial[reply.serial]]
    assert by_serial[replies[-1].serial] == "issuing-3"
    assert {by_serial[reply.serial] for reply in replies} == {"issuing-2", "issuing-3"}, "issued across the switch"
    async with sql.cursor() as cur:
        assert await invariants.check_all(cur) == {name: [] for name in invariants.CHECKS}


async def test_the_audit_log_verifies_with_checkpoints_signed_before_and_after_the_rollover(env, rig, client,
                                                                                           sql) -> None:
    """The sealer signs checkpoints with the audit signer of the CA issued from; `hapki audit verify` checks each
    under its own signer's certificate, which its own issuing CA certified."""
    await _issue(client, "audit-after-rollover.example.com")  # something new to chain and sign
    deadline = time.monotonic() + 15
    while True:
        signers = dict(await query(sql, "SELECT issuer, COUNT(*) FROM audit_checkpoints GROUP BY issuer"))
        head = (await query(sql, "SELECT h.seq, (SELECT MAX(seq) FROM audit_checkpoints) FROM audit_head h"))[0]
        if head[0] == head[1] and set(signers) >= {"issuing-1", "issuing-3"}:
            break
        assert time.monotonic() < deadline, (signers, head)
        await asyncio.sleep(0.2)
    config = stack.write_config(_config(env), env.base_dir / "cara-audit.toml")

    async def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [*stack.hapki_command(), "audit", "verify", "--config", str(config), "--json", *args],
            capture_output=True, text=True, timeout=120)

    for pinned in ((), ("--root", str(env.base_dir / "root.pem"))):  # `hapki ca init --out` wrote the root there
        done = await verify(*pinned)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["ok"] is True
    # Pinned to another root, no checkpoint counts: the database's issuers are not trusted on their own.
    stranger = env.base_dir / "stranger-root.pem"
    stranger.write_bytes(self_signed_ca("stranger root")[0].public_bytes(Encoding.PEM))
    done = await verify("--root", str(stranger))
    assert done.returncode == 1
    assert {f["problem"] for f in json.loads(done.stdout)["findings"]} == {"checkpoint_invalid"}


async def test_ca_list_names_every_issuer_and_the_one_issued_from(env, rig, sql) -> None:
    config = stack.write_config(_config(env), env.base_dir / "cara-list.toml")
    listed = await asyncio.to_thread(subprocess.run, [*stack.hapki_command(), "ca", "list", "--config", str(config),
                                                      "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["issuing-3", "issuing-2", "issuing-1"]  # newest first
    assert [(r["default"], r["issued_from"]) for r in rows] == [(True, True), (False, False), (False, False)]
    counts = dict(await query(sql, "SELECT issuer, COUNT(*) FROM certificates GROUP BY issuer"))
    assert {r["name"]: r["certificates"] for r in rows} == {name: counts.get(name, 0) for name in
                                                           ("issuing-1", "issuing-2", "issuing-3")}
    assert all(r["ocsp_responder_not_after"] and r["audit_signer"] and 3640 < r["days_left"] <= 3653 for r in rows)
    assert rows[2]["full_crl"]["entries"] >= 1  # the revocation of the first test
    text = await asyncio.to_thread(subprocess.run, [*stack.hapki_command(), "ca", "list", "--config", str(config)],
                                   capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and text.stdout.startswith("issuing-3 (default, issued from): CN=hapki Issuing CA 3")


async def test_an_issuing_ca_that_ended_is_no_longer_served(env, rig, client, http) -> None:
    """Eleven years on (a member's clock), issuing-1 and issuing-2 have ended and so has everything they issued:
    no CRL publisher, no OCSP answer about them; the CA issued from is kept whatever its end."""
    cara, _ = rig
    before_end = await _issue(client, "served-until-its-ca-ends.example.com")  # issuing-3
    now = [datetime.now(UTC)]
    other = CaraRuntime(stack.cara_config(env, member="cara-9", http_listen=LISTEN, issuers_check_seconds=3600),
                        clock=lambda: now[0])
    await other.open()  # passive: it serves OCSP and keeps the publishers, signs nothing
    try:
        assert other.issuers is not None
        assert set(other.issuers.served) == {"issuing-1", "issuing-2", "issuing-3"}
        assert other.issuers.router.issuers == ["issuing-1", "issuing-2", "issuing-3"]
        now[0] += timedelta(days=11 * 366)
        await other.issuers.refresh()
        assert set(other.issuers.served) == {"issuing-3"} and other.issuers.router.issuers == ["issuing-3"]
        old = await _ocsp(http, other, _first_of(cara, "issuing-1"))
        assert old.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
        kept = await _ocsp(http, other, before_end)
        assert kept.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    finally:
        await other.stop()


def _first_of(cara: CaraRuntime, issuer: str) -> IssueReply:
    """A stand-in reply for an OCSP request about `issuer` (a certificate number 1 under that CA's name and key)."""
    served = cara.issuers.served[issuer]  # type: ignore[union-attr]
    ca = served.record.certificate
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.now(UTC)).not_valid_after(datetime.now(UTC))
            .sign(key, hashes.SHA256()))
    return IssueReply(request_id="0" * 32, status="issued", serial="01",
                      certificate_pem=leaf.public_bytes(Encoding.PEM).decode(), chain_pem=served.record.chain_pem)


async def test_the_root_revokes_an_issuing_ca_on_its_crl_and_its_certificates_stop_verifying(env, rig, http, sql,
                                                                                          tmp_path) -> None:
    """`hapki ca revoke-issuer`: not the CA issued from; the root's CRL (ARL) lists the revoked one, signed by the
    root; OCSP answers `revoked` (cACompromise) about what it issued; openssl's chain check with CRLs at every level
    refuses its certificates and accepts the new CA's. New issuing CA certificates name the ARL."""
    cara, _ = rig
    assert cara.issuers is not None
    config = stack.write_config(_config(env), env.base_dir / "cara-revoke.toml")

    async def hapki_ca(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, [*stack.hapki_command(), "ca", *args, "--config", str(config)],
                                       capture_output=True, text=True, timeout=120)

    refused = await hapki_ca("revoke-issuer", "--name", "issuing-3", "--reason", "key_compromise")
    assert refused.returncode == 1 and "is the default" in refused.stderr, refused.stdout + refused.stderr
    [(leaf_pem,)] = await query(sql, "SELECT cert_pem FROM certificates WHERE issuer = 'issuing-2' LIMIT 1")
    [(chain_2,), (chain_3,)] = await query(sql, "SELECT chain_pem FROM issuers WHERE name IN ('issuing-2',"
                                                " 'issuing-3') ORDER BY name")

    done = await hapki_ca("revoke-issuer", "--name", "issuing-2", "--reason", "key_compromise")

    assert done.returncode == 0, done.stdout + done.stderr
    [(first_arl,)] = await query(sql, "SELECT MIN(crl_number) FROM crls WHERE issuer = 'root'")  # `ca init`'s
    signed = re.search(r"the root's CRL (\d+) lists 1 revoked issuing CA\(s\)", done.stdout)
    assert signed and int(signed.group(1)) > first_arl, done.stdout
    ca_2, root = x509.load_pem_x509_certificates(chain_2.encode())
    ca_3 = x509.load_pem_x509_certificates(chain_3.encode())[0]
    arl = await _crl(http, cara, "root")
    assert arl.is_signature_valid(root.public_key()) and arl.issuer == root.subject
    entry = arl.get_revoked_certificate_by_serial_number(ca_2.serial_number)
    assert entry is not None and len(arl) == 1
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    # Issuing CAs made by a rollover name the root's CRL (issuing-1, from `hapki ca init` without a public URL, not).
    [point] = ca_3.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert point.full_name == [x509.UniformResourceIdentifier(f"{PUBLIC_URL}/crl/root.crl")]

    # OCSP about what issuing-2 issued: revoked, as of the CA's revocation, reason cACompromise.
    await cara.issuers.refresh()
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    reply = IssueReply(request_id="0" * 32, status="issued", serial=format(leaf.serial_number, "x"),
                       certificate_pem=leaf_pem, chain_pem=chain_2)
    answer = await _ocsp(http, cara, reply)
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason is x509.ReasonFlags.ca_compromise

    # openssl, CRLs at every level (the root's and each issuing CA's): issuing-2's leaf refused, issuing-3's not.
    leaf_3 = (await query(sql, "SELECT cert_pem FROM certificates WHERE issuer = 'issuing-3' LIMIT 1"))[0][0]
    root_file = tmp_path / "root.pem"
    root_file.write_bytes(root.public_bytes(Encoding.PEM))
    for name, ca, leaf_text, ok in (("issuing-2", ca_2, leaf_pem, False), ("issuing-3", ca_3, leaf_3, True)):
        crls = tmp_path / f"{name}-crls.pem"
        crls.write_bytes(arl.public_bytes(Encoding.PEM) + (await _crl(http, cara, name)).public_bytes(Encoding.PEM))
        (tmp_path / f"{name}.pem").write_bytes(ca.public_bytes(Encoding.PEM))
        (tmp_path / f"{name}-leaf.pem").write_text(leaf_text)
        checked = subprocess.run(["openssl", "verify", "-crl_check_all", "-CAfile", str(root_file), "-untrusted",
                                  str(tmp_path / f"{name}.pem"), "-CRLfile", str(crls),
                                  str(tmp_path / f"{name}-leaf.pem")], capture_output=True, text=True, timeout=30)
        assert (checked.returncode == 0) is ok, (name, checked.stdout + checked.stderr)
        if not ok:
            assert "certificate revoked" in checked.stdout + checked.stderr

    again = await hapki_ca("revoke-issuer", "--name", "issuing-2", "--reason", "superseded")
    assert again.returncode == 1 and "was revoked" in again.stderr
    back = await hapki_ca("rollover", "--name", "issuing-2")
    assert back.returncode == 1 and "nothing may issue from it" in back.stderr
    resigned = await hapki_ca("arl")
    again_signed = re.search(r"the root's CRL (\d+) lists 1 ", resigned.stdout)
    assert resigned.returncode == 0 and again_signed, resigned.stdout
    assert int(again_signed.group(1)) > int(signed.group(1)), "CRL numbers strictly increase (RFC 5280 5.2.3)"
    listed = await hapki_ca("list", "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["issuing-2"]["revoked"]["reason"] == "key_compromise" and rows["issuing-3"]["revoked"] is None
    kinds = await query(sql, "SELECT kind FROM audit_entries WHERE issuer IN ('issuing-2', 'root')"
                             " AND kind IN ('issuer.revoked', 'crl.published')")
    assert sorted(k for (k,) in kinds).count("issuer.revoked") == 1


async def test_a_second_rollover_to_the_default_changes_nothing(env, rig, sql) -> None:
    [(issuers,)] = await query(sql, "SELECT COUNT(*) FROM issuers")

    done = _rollover(env, "--name", "issuing-3")

    assert done.returncode == 0, done.stderr
    assert "is the default already; nothing to do" in done.stdout
    assert await query(sql, "SELECT COUNT(*) FROM issuers") == [(issuers,)]


async def test_a_rollover_that_cannot_make_its_key_changes_nothing_and_says_why(env, rig, sql) -> None:
    """Two HSM members, one of them missing its token: the new key cannot be replicated, so there is no new CA."""
    [(issuers,)] = await query(sql, "SELECT COUNT(*) FROM issuers")
    cfg = _config(env)
    present = cfg.hsm.members[0]
    missing = present.model_copy(update={"name": "hsm-b", "token_label": "no-such-token"})
    config = stack.write_config(cfg.model_copy(update={"hsm": cfg.hsm.model_copy(update={"members": [present, missing]})}),
                                env.base_dir / "cara-rollover-hsm-b.toml")
    done = await asyncio.to_thread(subprocess.run, [*stack.hapki_command(), "ca", "rollover", "--config", str(config)],
                                   capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no rollover, nothing changed" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert await query(sql, "SELECT COUNT(*) FROM issuers") == [(issuers,)]


async def test_an_unusable_name_is_refused_before_any_key_is_made(env, rig, sql) -> None:
    [(issuers,)] = await query(sql, "SELECT COUNT(*) FROM issuers")
    for name in ("../evil", "ca-delta", "x" * 65, ""):
        done = _rollover(env, "--name", name)
        assert done.returncode == 2 and "--name" in done.stderr, (name, done.stdout, done.stderr)
    assert await query(sql, "SELECT COUNT(*) FROM issuers") == [(issuers,)]


async def test_ca_init_on_a_site_from_before_the_root_crl_signs_one(env, rig, sql) -> None:
    """A CA initialised before the ARL existed (no crls rows of the root): `hapki ca init` signs it, listing what the
    root revoked; nothing else changes."""
    await query(sql, "DELETE FROM crls WHERE issuer = 'root'")
    [(issuers,)] = await query(sql, "SELECT COUNT(*) FROM issuers")
    config = stack.write_config(_config(env), env.base_dir / "cara-init-again.toml")

    done = await asyncio.to_thread(subprocess.run, [*stack.hapki_command(), "ca", "init", "--config", str(config)],
                                   capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    signed = re.search(r"the root's CRL (\d+) lists 1 revoked issuing CA\(s\)", done.stdout)
    assert signed and "nothing to do" in done.stdout, done.stdout
    assert await query(sql, "SELECT COUNT(*) FROM issuers") == [(issuers,)]
    assert await query(sql, "SELECT crl_number, entries FROM crls WHERE issuer = 'root'") == [(int(signed.group(1)), 1)]
