"""The watcher: turns this member's floating-IP ownership, as the kernel reports it, into events and spans.

Polls a netlink address dump (microseconds each) and publishes `pki.v1.ha.ownership_changed` on every change.
The HA lab (next) adds the signer/scheduler activation that follows these changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from nats.aio.client import Client
from opentelemetry import trace
from pydantic import Field

from hapki.contracts import subjects
from hapki.contracts.models import OwnershipChanged
from hapki.runtime import bus, telemetry
from hapki.runtime.clock import utcnow
from hapki.runtime.config import NatsConfig, StrictModel
from hapki.watcher.netlink import AddressDump

log = logging.getLogger("hapki.watcher")
tracer = trace.get_tracer("hapki.watcher")


class WatcherConfig(StrictModel):
    """One watcher: which member, which tier's floating IP."""

    member: str = Field(description="Member name, e.g. cara-1")
    tier: str = Field(description="cara or clm")
    vip: str = Field(description="The tier's floating IP address")
    poll_seconds: float = Field(default=0.05, gt=0, le=5, description="Kernel poll interval, seconds")
    nats: NatsConfig


class AddressSource(Protocol):
    def addresses(self) -> set[str]: ...


class Watcher:
    """Emits an OwnershipChanged event whenever `vip in source.addresses()` flips (and once at start)."""

    def __init__(self, config: WatcherConfig, source: AddressSource, publish: Callable[[OwnershipChanged], object],
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._config, self._source, self._publish, self._clock = config, source, publish, clock
        self.holds_vip: bool | None = None

    async def poll_once(self) -> OwnershipChanged | None:
        holds = self._config.vip in self._source.addresses()
        if holds == self.holds_vip:
            return None
        self.holds_vip = holds
        event = OwnershipChanged(tier=self._config.tier, member=self._config.member, vip=self._config.vip,
                                 holds_vip=holds, observed_at=self._clock())
        with tracer.start_as_current_span("watcher.ownership_changed") as span:
            span.set_attribute("pki.tier", event.tier)
            span.set_attribute("pki.member", event.member)
            span.set_attribute("pki.holds_vip", holds)
            log.info("%s %s the %s VIP %s", event.member, "holds" if holds else "released", event.tier, event.vip)
            result = self._publish(event)
            if asyncio.iscoroutine(result):
                await result
        return event


class WatcherRuntime:
    def __init__(self, config: WatcherConfig) -> None:
        self.config = config
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._dump: AddressDump | None = None

    async def start(self) -> None:
        self._nc = await bus.connect(self.config.nats, name=f"hapki-watcher-{self.config.member}")
        self._dump = AddressDump()
        nc = self._nc

        async def publish(event: OwnershipChanged) -> None:
            await nc.publish(subjects.HA_OWNERSHIP_CHANGED, event.model_dump_json().encode(), headers=telemetry.inject())

        watcher = Watcher(self.config, self._dump, publish)
        self._task = asyncio.create_task(self._loop(watcher))

    async def _loop(self, watcher: Watcher) -> None:
        while True:
            await watcher.poll_once()
            await asyncio.sleep(self.config.poll_seconds)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._dump is not None:
            self._dump.close()
        if self._nc is not None:
            await self._nc.close()
