"""The watcher reports VIP ownership flips (and the first observation), read from the kernel via netlink."""

from __future__ import annotations

from datetime import UTC, datetime

from hapki.contracts.models import OwnershipChanged
from hapki.runtime.config import NatsConfig
from hapki.watcher.main import Watcher, WatcherConfig
from hapki.watcher.netlink import AddressDump

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class FakeAddresses:
    def __init__(self) -> None:
        self.current: set[str] = set()

    def addresses(self) -> set[str]:
        return set(self.current)


async def test_events_on_first_observation_and_on_every_flip_only() -> None:
    source, events = FakeAddresses(), []
    config = WatcherConfig(member="cara-1", tier="cara", vip="10.20.0.100", nats=NatsConfig(servers=["nats://x:1"]))
    watcher = Watcher(config, source, events.append, clock=lambda: T0)
    await watcher.poll_once()
    await watcher.poll_once()
    source.current = {"10.20.0.100", "10.20.0.1"}
    await watcher.poll_once()
    await watcher.poll_once()
    source.current = {"10.20.0.1"}
    await watcher.poll_once()
    assert [e.holds_vip for e in events] == [False, True, False]
    assert all(isinstance(e, OwnershipChanged) and e.member == "cara-1" and e.observed_at == T0 for e in events)


def test_netlink_dump_sees_the_kernels_loopback_address() -> None:
    dump = AddressDump()
    try:
        addresses = dump.addresses()
        assert "127.0.0.1" in addresses
        assert dump.addresses() == addresses  # repeatable on the same socket
    finally:
        dump.close()
