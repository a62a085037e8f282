"""No secret in any log: the single-host stack (NATS, MariaDB, SoftHSM, CARA and CLM processes) at DEBUG, driven
through issuance, a revocation (CRL signed in the HSM) and bad requests, then every log file it wrote is scanned
for the HSM PINs, the database password and private key material (hapki.lab.secrets_scan)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from hapki.cli.client import ClmClient, new_key_and_csr
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode
from hapki.contracts.models import IssueCertificate, RequestStatus, RevocationReason, RevokeCertificate
from hapki.lab.secrets_scan import log_files, scan_tree, secrets_in
from hapki.lab.stack import LocalStack, nats_config
from hapki.runtime.config import NatsConfig

pytestmark = pytest.mark.integration


async def _drive(nats: NatsConfig) -> None:
    client = await ClmClient.connect(nats, timeout=30.0)
    try:
        serials = []
        for index in range(3):
            csr = new_key_and_csr([f"s{index}.example.com"])[0].decode()
            reply = await client.issue(IssueCertificate(csr_pem=csr, profile="tls-server", requester="secrets-test",
                                                        idempotency_key=f"secrets-{index}"))
            assert reply.status is RequestStatus.ISSUED, reply
            serials.append(reply.serial)
        revoked = await client.revoke(RevokeCertificate(serial=serials[0], reason=RevocationReason.KEY_COMPROMISE,
                                                        requester="secrets-test"))
        assert revoked.error is None
        bad = await client.issue(IssueCertificate(csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nnope\n",
                                                  profile="tls-server", requester="secrets-test"))
        assert bad.error is not None and bad.error.code is ErrorCode.MALFORMED_CSR
        assert b"MALFORMED_MESSAGE" in await client.raw(subjects.CLM_ISSUE, b"{not json")
        await asyncio.sleep(3)  # the CRL publisher reacts to the revocation (signs in the HSM) and logs it
    finally:
        await client.close()


def test_no_secret_in_any_log_of_a_stack_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAPKI_LOG_LEVEL", "DEBUG")  # the most a log can say; the services inherit it
    stack = LocalStack(tmp_path, trace_file=tmp_path / "logs" / "spans.jsonl")
    stack.start()
    try:
        asyncio.run(_drive(nats_config(stack.env, "client")))
    finally:
        stack.stop()  # flushes and closes every log

    secrets = secrets_in(tmp_path)
    labels = " ".join(secrets)
    assert ".pin" in labels and ".so-pin" in labels and "password" in labels, labels  # the check can fail
    logs = log_files(tmp_path)
    names = {path.name for path in logs}
    assert {"clm.log", "cara.log", "spans.jsonl"} <= names, names
    assert sum(path.stat().st_size for path in logs) > 10_000  # DEBUG logs of a real run, not empty files
    findings = scan_tree(tmp_path)
    assert findings == [], "secrets in logs:\n" + "\n".join(map(str, findings))
    assert os.environ.get("HAPKI_LOG_LEVEL") == "DEBUG"
