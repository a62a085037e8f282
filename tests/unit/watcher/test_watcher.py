"""The watcher reports role changes (VIP from the kernel, health from the local service), nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

from hapki.contracts.models import HAEvent, HARole
from hapki.runtime.config import NatsConfig
from hapki.runtime.netlink import AddressDump
from hapki.watcher.main import Watcher, WatcherConfig

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VIP = "10.213.2.100"


class FakeAddresses:
    def __init__(self) -> None:
        self.current: set[str] = set()

    def addresses(self) -> set[str]:
        return set(self.current)


def _watcher(source, events, health=None) -> Watcher:
    config = WatcherConfig(member="cara-1", tier="cara", vip=VIP, health_poll_seconds=0.5,
                           nats=NatsConfig(servers=["nats://x:1"]))

    async def publish(event: HAEvent) -> None:
        events.append(event)

    return Watcher(config, source, publish, health, clock=lambda: T0)


async def test_events_on_first_observation_and_on_every_vip_flip_only() -> None:
    source, events = FakeAddresses(), []
    watcher = _watcher(source, events)
    await watcher.poll_once()
    await watcher.poll_once()
    source.current = {VIP, "10.213.2.11"}
    await watcher.poll_once()
    await watcher.poll_once()
    source.current = {"10.213.2.11"}
    await watcher.poll_once()
    assert [(e.role, e.reason) for e in events] == [
        (HARole.PASSIVE, "watcher started"), (HARole.ACTIVE, "vip gained"), (HARole.PASSIVE, "vip lost")]
    assert all(e.member == "cara-1" and e.observed_at == T0 for e in events)


async def test_health_turns_into_fault_recovery_and_epoch_events() -> None:
    source, events = FakeAddresses(), []
    report: list[dict | None] = [{"status": "ok", "active": True, "epoch": 4}]

    async def health():
        return report[0]

    watcher = _watcher(source, events, health)
    source.current = {VIP}
    await watcher.poll_once(now=0.0)
    report[0] = None  # the service died
    await watcher.poll_once(now=0.1)  # not polled yet: health is polled every 0.5 s
    await watcher.poll_once(now=0.6)
    report[0] = {"status": "ok", "active": True, "epoch": 5}
    await watcher.poll_once(now=1.2)
    assert [(e.role, e.epoch, e.reason) for e in events] == [
        (HARole.ACTIVE, 4, "watcher started"),
        (HARole.FAULT, None, "service unreachable or unhealthy"),
        (HARole.ACTIVE, 5, "service recovered"),
    ]


def test_netlink_dump_sees_the_kernels_loopback_address() -> None:
    dump = AddressDump()
    try:
        addresses = dump.addresses()
        assert "127.0.0.1" in addresses
        assert dump.addresses() == addresses  # repeatable on the same socket
    finally:
        dump.close()


async def test_role_changes_and_the_active_state_are_metrics() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    source, events = FakeAddresses(), []
    config = WatcherConfig(member="cara-1", tier="cara", vip=VIP, nats=NatsConfig(servers=["nats://x:1"]))

    async def publish(event: HAEvent) -> None:
        events.append(event)

    watcher = Watcher(config, source, publish, None, clock=lambda: T0, meter=meter)
    await watcher.poll_once()
    source.current = {VIP}
    await watcher.poll_once()
    data = {m.name: m.data.data_points for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics}
    assert sum(p.value for p in data["hapki.ha.role_changes"]) == 2
    assert [p.value for p in data["hapki.ha.active"]] == [1]
