"""A lost dependency gives clients a retryable UNAVAILABLE error, not a timeout; service resumes when it is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from hapki.contracts.errors import ErrorCode
from hapki.contracts.models import IssueCertificate, RequestStatus
from helpers.csr import make_csr, make_key

pytestmark = pytest.mark.integration


async def test_database_down_gives_unavailable_then_recovers(env, client) -> None:
    csr_pem, _ = make_csr(["db-down.example.com"], key=make_key("p256"))
    request = IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests")
    env.db.stop()
    try:
        started = time.monotonic()
        reply = await client.issue(request)
        assert reply.error is not None and reply.error.code is ErrorCode.UNAVAILABLE, reply
        assert time.monotonic() - started < 14, "the client must get an answer within its timeout"
    finally:
        env.db.start()
    for _ in range(40):  # pools reconnect on their own
        reply = await client.issue(request)
        if reply.error is None:
            break
        await asyncio.sleep(0.25)
    assert reply.status is RequestStatus.ISSUED, reply
