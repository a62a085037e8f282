"""A signer that stops hands back (NAKs) every message the server delivered to it and it did not process,
also one delivered to its pull request after the last fetch took its messages (hapki.cara.signer)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace

from hapki.cara.config import SignerConfig
from hapki.cara.signer import Signer


class Delivered:
    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers, self.data, self.naks = headers, b"{}", 0

    async def nak(self, delay: float | None = None) -> None:
        self.naks += 1


class PullRequest:
    """nats-py's pull subscription as the fetch loop uses it: fetch() waits (nothing to take), and what the server
    delivers meanwhile waits in the subscription's pending queue."""

    def __init__(self) -> None:
        self._sub = SimpleNamespace(_pending_queue=asyncio.Queue())
        self.fetching = asyncio.Event()
        self.unsubscribed = False

    async def fetch(self, batch: int, timeout: float) -> list[Delivered]:
        self.fetching.set()
        await asyncio.sleep(3600)
        return []

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class Bus:
    def __init__(self, psub: PullRequest) -> None:
        self.psub = psub

    async def pull_subscribe_bind(self, durable: str, stream: str) -> PullRequest:
        return self.psub


async def test_a_message_delivered_after_the_last_fetch_is_handed_back_on_stop() -> None:
    psub = PullRequest()
    signer = Signer(nc=None, js=Bus(psub), store=None,  # type: ignore[arg-type]
                    issuer=SimpleNamespace(name="ca", certificate=None, chain_pem=""), issuer_key=None,  # type: ignore[arg-type]
                    member="cara-1", config=SignerConfig(), clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
                    approvals=None, profiles={})  # type: ignore[arg-type]
    signer._pull(7)  # noqa: SLF001 - start() without the store's epoch bump
    await asyncio.wait_for(psub.fetching.wait(), 5)
    late, status = Delivered(), Delivered({"Status": "408"})  # a request, and the answer to an old pull request
    psub._sub._pending_queue.put_nowait(late)  # noqa: SLF001 - as nats-py queues a delivery
    psub._sub._pending_queue.put_nowait(status)  # noqa: SLF001
    await signer.stop()
    assert psub.unsubscribed
    assert late.naks == 1, "a delivered message was dropped with the subscription: it would wait for ack_wait"
    assert status.naks == 0
