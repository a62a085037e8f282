"""The watcher: turns this member's role, as the kernel and its local service report it, into HA events.

It reads VIP ownership from the kernel (netlink address dump, microseconds) at once when the kernel announces an
address change, and at least every `poll_seconds`; every `health_poll_seconds` (and at once after a VIP change) it
reads the local service's /health. A change of role
(active / passive / fault) or of the epoch is published on `pki.v1.ha.events.<tier>.<member>` into the
PKI_HA_EVENTS stream, with a span `watcher.role_changed`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import aiohttp
from nats.aio.client import Client
from opentelemetry import metrics, trace
from pydantic import Field

from hapki.contracts import subjects
from hapki.contracts.models import HAEvent, HARole
from hapki.runtime import bus, telemetry
from hapki.runtime import metrics as metrics_catalog
from hapki.runtime.clock import utcnow
from hapki.runtime.config import MetricsConfig, NatsConfig, ServiceConfig
from hapki.runtime.netlink import AddressChanges, AddressDump
from hapki.runtime.tasks import cancel_and_wait

log = logging.getLogger("hapki.watcher")
tracer = trace.get_tracer("hapki.watcher")


class WatcherConfig(ServiceConfig):
    """One watcher: which member, which tier's floating IP, which local service."""

    member: str = Field(description="Member name, e.g. cara-1")
    tier: str = Field(description="cara or clm")
    vip: str = Field(description="The tier's floating IP address")
    health_url: str | None = Field(default=None, description="The local service's health URL; None: VIP only")
    poll_seconds: float = Field(
        default=0.5, gt=0, le=5,
        description="Longest wait between two reads of the VIP from the kernel, seconds; an address change the "
        "kernel announces (netlink) is read at once")
    health_poll_seconds: float = Field(default=0.5, gt=0, le=30, description="Health poll interval, seconds")
    nats: NatsConfig
    metrics: MetricsConfig = Field(
        default=MetricsConfig(listen=f"0.0.0.0:{metrics_catalog.PORTS['watcher']}"),
        description="GET /metrics for Prometheus (port 9103)")


class AddressSource(Protocol):
    def addresses(self) -> set[str]: ...


HealthSource = Callable[[], Awaitable[dict[str, Any] | None]]  # None: the service did not answer


def role_of(holds_vip: bool, health: dict[str, Any] | None, health_checked: bool) -> HARole:
    """Fault when the service is unreachable or says it cannot serve; else active exactly with the VIP."""
    if health_checked and (health is None or health.get("status") not in (None, "ok")):
        return HARole.FAULT
    return HARole.ACTIVE if holds_vip else HARole.PASSIVE


class Watcher:
    """Emits an HAEvent when the role or the epoch changes (and once at start)."""

    def __init__(self, config: WatcherConfig, source: AddressSource, publish: Callable[[HAEvent], Awaitable[None]],
                 health: HealthSource | None = None, clock: Callable[[], datetime] = utcnow,
                 meter: metrics.Meter | None = None) -> None:
        self._config, self._source, self._publish, self._health, self._clock = config, source, publish, health, clock
        meter = meter or metrics.get_meter("hapki.watcher")
        self._changes = metrics_catalog.counter("hapki.ha.role_changes", meter)
        metrics_catalog.gauge("hapki.ha.active", self._observe_active, meter)
        metrics_catalog.gauge("hapki.ha.epoch", self._observe_epoch, meter)
        self.holds_vip: bool | None = None
        self._last: tuple[HARole, int | None] | None = None
        self._health_report: dict[str, Any] | None = None
        self._health_at = float("-inf")

    async def poll_once(self, now: float | None = None) -> HAEvent | None:
        now = time.monotonic() if now is None else now
        holds = self._config.vip in self._source.addresses()
        vip_changed = holds != self.holds_vip
        self.holds_vip = holds
        if self._health is not None and (vip_changed or now - self._health_at >= self._config.health_poll_seconds):
            self._health_report = await self._health()
            self._health_at = now
        role = role_of(holds, self._health_report, self._health is not None)
        epoch = (self._health_report or {}).get("epoch")
        if self._last == (role, epoch):
            return None
        reason = self._reason(vip_changed, holds, role, epoch)
        self._last = (role, epoch)
        event = HAEvent(tier=self._config.tier, member=self._config.member, vip=self._config.vip, role=role,
                        holds_vip=holds, epoch=epoch, observed_at=self._clock(), reason=reason,
                        health=self._health_report or {})
        self._changes.add(1, {**self._attributes(), "pki.role": event.role.value})
        with tracer.start_as_current_span("watcher.role_changed") as span:
            span.set_attribute("pki.tier", event.tier)
            span.set_attribute("pki.member", event.member)
            span.set_attribute("pki.role", event.role.value)
            if epoch is not None:
                span.set_attribute("pki.epoch", epoch)
            log.info("%s is %s (%s)", event.member, event.role.value, reason)
            await self._publish(event)
        return event

    def _attributes(self) -> dict[str, str]:
        return {"pki.tier": self._config.tier, "pki.member": self._config.member}

    def _observe_active(self) -> list[tuple[float, dict[str, str]]]:
        active = self._last is not None and self._last[0] is HARole.ACTIVE
        return [(int(active), self._attributes())]

    def _observe_epoch(self) -> list[tuple[float, dict[str, str]]]:
        if self._last is None or self._last[1] is None:
            return []
        return [(self._last[1], self._attributes())]

    def _reason(self, vip_changed: bool, holds: bool, role: HARole, epoch: int | None) -> str:
        if self._last is None:
            return "watcher started"
        if role is HARole.FAULT:
            return "service unreachable or unhealthy"
        if vip_changed:
            return "vip gained" if holds else "vip lost"
        if self._last[0] is HARole.FAULT:
            return "service recovered"
        return f"epoch changed to {epoch}"


class WatcherRuntime:
    def __init__(self, config: WatcherConfig) -> None:
        self.config = config
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._dump: AddressDump | None = None
        self._changes: AddressChanges | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._nc = await bus.connect(self.config.nats, name=f"hapki-watcher-{self.config.member}",
                                     stream=subjects.HA_EVENTS_STREAM)
        js = self._nc.jetstream()
        await bus.ensure_topology(js, self.config.nats, consumer=False, streams=(subjects.HA_EVENTS_STREAM,))
        self._changes = AddressChanges()  # before the first dump: no change falls between the two
        self._dump = AddressDump()

        async def publish(event: HAEvent) -> None:
            subject = subjects.ha_events(event.tier, event.member)
            await js.publish(subject, event.model_dump_json().encode(), headers=telemetry.inject(), timeout=2.0)

        health: HealthSource | None = None
        if self.config.health_url:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
            health = self._fetch_health
        watcher = Watcher(self.config, self._dump, publish, health)
        self._task = asyncio.create_task(self._loop(watcher))

    async def _fetch_health(self) -> dict[str, Any] | None:
        assert self._http is not None and self.config.health_url is not None
        try:
            async with self._http.get(self.config.health_url) as response:
                report = json.loads(await response.text())
                if response.status != 200:
                    report["status"] = report.get("status") or f"http {response.status}"
                return report
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("health of %s unreachable: %s", self.config.member, exc)
            return None

    async def _loop(self, watcher: Watcher) -> None:
        while True:
            try:
                await watcher.poll_once()
            except Exception:  # a failed publish (bus failing over) must not end the watcher: log and go on
                log.exception("watcher poll failed")
            assert self._changes is not None
            await self._changes.wait(self.config.poll_seconds)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)  # again and again: a cancel can be lost (hapki.runtime.tasks)
        if self._http is not None:
            await self._http.close()
        if self._changes is not None:
            self._changes.close()
        if self._dump is not None:
            self._dump.close()
        if self._nc is not None:
            await bus.close(self._nc)
