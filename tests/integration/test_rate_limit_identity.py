"""CLM's rate limits key on who is asking, not on the requester a message names (issue 6), on a real nats-server
with the lab's accounts (clients in their own account, importing the CLM API with share: true) and a real MariaDB.

Revocations of unknown serials: the limiter runs first, so a request it lets through answers NOT_FOUND, one it
stops answers RATE_LIMITED; no CA is needed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest

from hapki.clm.main import ClmRuntime
from hapki.contracts import subjects
from hapki.lab import stack
from hapki.lab.local import LocalEnv, free_port

pytestmark = pytest.mark.integration

ONE_PER_HOUR = {"per_second": 1 / 3600, "burst": 1}


@pytest.fixture(scope="module")
async def clm(env: LocalEnv) -> AsyncIterator[ClmRuntime]:
    config = stack.clm_config(env, rate_limit={"default": ONE_PER_HOUR}, http_listen=f"127.0.0.1:{free_port()}")
    runtime = ClmRuntime(config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def _revoke(requester: str) -> bytes:
    return json.dumps({"serial": secrets.token_hex(8), "reason": "superseded", "requester": requester}).encode()


async def _ask(env: LocalEnv, user: str, requester: str, headers: dict[str, str] | None = None) -> str:
    """The error code of a revocation sent as bus `user`, naming `requester`."""
    nc = await nats.connect(**env.nats.connect_kwargs(user), connect_timeout=5)
    try:
        reply = await nc.request(subjects.CLM_REVOKE, _revoke(requester), timeout=10, headers=headers)
    finally:
        await nc.close()
    return json.loads(reply.data)["error"]["code"]


async def test_bus_clients_are_limited_by_their_bus_user(env: LocalEnv, clm: ClmRuntime) -> None:
    assert await _ask(env, "client", "alice") == "NOT_FOUND"  # the one token of bus user `client`
    # Another name does not buy another bucket; claiming another user's identity in the header changes nothing:
    # the server replaces the header with the truth.
    assert await _ask(env, "client", "bob") == "RATE_LIMITED"
    forged = {"Nats-Request-Info": json.dumps({"acc": "CLIENTS", "user": "client-b"})}
    assert await _ask(env, "client", "carol", headers=forged) == "RATE_LIMITED"
    # And the other bus user's bucket is untouched by all that, whatever requester it names.
    assert await _ask(env, "client-b", "alice") == "NOT_FOUND"
    assert await _ask(env, "client-b", "alice") == "RATE_LIMITED"


async def _post(clm: ClmRuntime, requester: str, forwarded: str | None) -> tuple[int, dict[str, Any]]:
    url = f"http://{clm.config.http_listen}/v1/revoke"
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=_revoke(requester), headers={**headers, "Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status, await response.json()


async def test_https_clients_are_limited_by_the_address_haproxy_saw(clm: ClmRuntime) -> None:
    # From 127.0.0.1, the trusted proxy: the address it forwards is the client's.
    assert (await _post(clm, "alice", "203.0.113.7"))[0] == 404
    assert (await _post(clm, "bob", "203.0.113.7"))[0] == 429  # same client, another name: same bucket
    status, body = await _post(clm, "alice", "203.0.113.8")  # another client, the same name: its own bucket
    assert status == 404, body
    # A list (a client's own header with the proxy's appended): the proxy's, the last one, counts.
    assert (await _post(clm, "dave", "198.51.100.1, 203.0.113.8"))[0] == 429
