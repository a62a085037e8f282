"""The signer's heartbeat: in_progress() for messages held longer than heartbeat_seconds, and no wake-up at all
while nothing is held (hapki.cara.signer.Signer; real NATS in tests/integration/test_signer_crash.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace

from hapki.cara.config import SignerConfig
from hapki.cara.signer import Signer

BEAT = 0.02


class HeldMsg:
    def __init__(self) -> None:
        self.reports = 0

    async def in_progress(self) -> None:
        self.reports += 1


def _signer() -> Signer:
    return Signer(nc=None, js=None, store=None, issuer=SimpleNamespace(name="ca", certificate=None, chain_pem=""),  # type: ignore[arg-type]
                  issuer_key=None, member="cara-1",  # type: ignore[arg-type]
                  config=SignerConfig(heartbeat_seconds=BEAT), clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
                  approvals=None, profiles={})  # type: ignore[arg-type]


async def test_a_held_message_is_reported_and_an_idle_signer_is_not_woken() -> None:
    signer, msg = _signer(), HeldMsg()
    assert signer._beat is None  # noqa: SLF001 - nothing held: no timer, so nothing wakes the process for it
    signer._inflight.add("r1", msg)  # noqa: SLF001 - what _admit() does for an admitted request
    signer._beat_later()  # noqa: SLF001
    await asyncio.sleep(5.5 * BEAT)
    assert 2 <= msg.reports <= 5, msg.reports  # about once per beat after its first one
    signer._inflight.discard("r1", msg)  # noqa: SLF001 - settled (acked)
    await asyncio.sleep(2 * BEAT)  # the beat armed while it was held runs once more, finds nothing, re-arms nothing
    reports = msg.reports
    assert signer._beat is None  # noqa: SLF001
    await asyncio.sleep(3 * BEAT)
    assert msg.reports == reports


async def test_stopping_disarms_the_heartbeat() -> None:
    signer, msg = _signer(), HeldMsg()
    signer._inflight.add("r1", msg)  # noqa: SLF001
    signer._beat_later()  # noqa: SLF001
    await signer.stop()
    await asyncio.sleep(3 * BEAT)
    assert msg.reports == 0 and signer._beat is None  # noqa: SLF001
