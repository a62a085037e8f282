"""hapki.cli.client.ClmClient: "no responders" for a CLM call means the server the client is on reaches no CLM
(cut off from the cluster, say): the client reconnects to another server of its list, at most once per
MOVE_GAP_SECONDS, and still reports the error to its caller (who retries with its idempotency key)."""

from __future__ import annotations

from urllib.parse import urlparse

import nats.errors
import pytest

from hapki.cli import client as client_module
from hapki.cli.client import ClmClient


class FakeClient:
    def __init__(self, servers: int) -> None:
        self.servers = [urlparse(f"tls://10.0.0.{i}:4222") for i in range(servers)]
        self.connected_url = self.servers[0]
        self.reconnects = 0

    async def request(self, *args: object, **kwargs: object) -> None:
        raise nats.errors.NoRespondersError()

    async def force_reconnect(self) -> None:
        self.reconnects += 1


async def test_no_responders_moves_the_client_once_per_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: now[0])
    nc = FakeClient(servers=3)
    client = ClmClient(nc)  # type: ignore[arg-type]
    for step in (0.0, 1.0, client_module.MOVE_GAP_SECONDS):
        now[0] += step
        with pytest.raises(nats.errors.NoRespondersError):
            await client.status("a" * 32)
    assert nc.reconnects == 2  # the first call, and the one a whole gap later; not the one 1 s after the first


async def test_a_client_of_one_server_stays() -> None:
    nc = FakeClient(servers=1)
    with pytest.raises(nats.errors.NoRespondersError):
        await ClmClient(nc).status("a" * 32)  # type: ignore[arg-type]
    assert nc.reconnects == 0
