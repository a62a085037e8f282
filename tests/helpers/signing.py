"""Forged signing requests, as a party holding CLM's bus publish rights would send them (issue 6).

Shared by tests/integration/test_ca_approval.py (single host) and tests/lab/test_lab_security.py (the HA lab);
`recorded_request` (a request as CLM records and approves it) by the signer tests.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiomysql

from hapki.clm.ports import NewRequest
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts import subjects
from hapki.contracts.models import IssueCertificate, SignCertificate
from hapki.runtime.approval import ApprovalKey
from hapki.runtime.clock import utcnow
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve
from helpers.csr import make_csr, make_key

PROFILES = load_profiles(SHIPPED_PROFILES_PATH)


def signing_content(names: list[str], request_id: str | None = None, requester: str = "tests") -> SignCertificate:
    """What CLM would approve for a fresh CSR with these names (no approval yet)."""
    csr_pem, _ = make_csr(names, key=make_key("p256", fresh=True), cn=names[0])
    return approve(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester=requester), PROFILES,
                   request_id or uuid.uuid4().hex)


async def recorded_request(approval_key: Path, store: MariaDBRequestStore, name: str,
                           requester: str = "tests") -> SignCertificate:
    """A request for `name` as CLM records it and approves it (signed with CLM's approval key file)."""
    request = ApprovalKey.from_file(approval_key).sign(signing_content([name], requester=requester))
    await store.record(NewRequest(request_id=request.request_id, requester=requester, idempotency_key=None,
                                  profile="tls-server", csr_sha256="0" * 64, approved=request), utcnow())
    return request


async def publish_signing_request(nc: Any, request: SignCertificate) -> None:
    """Straight into the signing stream, as CLM does (Nats-Msg-Id = request id), bypassing CLM."""
    await nc.jetstream().publish(subjects.CARA_SIGN, request.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": request.request_id})


async def rows(conn: aiomysql.Connection, statement: str, args: object = None) -> list[tuple]:
    async with conn.cursor() as cur:
        await cur.execute(statement, args)
        return list(await cur.fetchall())


async def audit_entries(sql: aiomysql.Connection, request_id: str, kind: str,
                        timeout: float = 10.0) -> list[dict[str, Any]]:
    """The audit entries of `kind` for `request_id`, once at least one exists (details parsed)."""
    for _ in range(int(timeout / 0.05)):
        found = await rows(sql, "SELECT detail FROM audit_entries WHERE request_id = %s AND kind = %s",
                           (request_id, kind))
        if found:
            return [json.loads(row[0]) for row in found]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} audit entry for {request_id}")
