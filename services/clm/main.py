"""CLM entry point: wires config -> database, bus, profiles -> ClmService -> FastStream responders."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from aiohttp import web
from faststream.nats import NatsBroker
from nats.aio.client import Client

from hapki.clm import http
from hapki.clm.app import build_broker
from hapki.clm.config import ClmConfig
from hapki.clm.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.clm.queue import JetStreamSigningQueue, NatsEventPublisher
from hapki.clm.service import ClmService
from hapki.clm.store import MariaDBRequestStore, MariaDBRevocationStore
from hapki.contracts.errors import HapkiError
from hapki.runtime import bus
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database
from hapki.runtime.http import serve
from hapki.runtime.migrate import migrate
from hapki.runtime.netlink import VipOwnership

log = logging.getLogger("hapki.clm")


class ClmRuntime:
    """One running CLM member: start() wires and starts everything, stop() undoes it."""

    def __init__(self, config: ClmConfig, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self._clock = clock
        self.db: Database | None = None
        self.nc: Client | None = None
        self.broker: NatsBroker | None = None
        self.service: ClmService | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.http: web.AppRunner | None = None

    async def start(self) -> None:
        cfg = self.config
        profiles = load_profiles(cfg.profiles_file or SHIPPED_PROFILES_PATH)
        self.db = Database(cfg.database)
        await migrate(self.db)
        self.nc = await bus.connect(cfg.nats, name=f"hapki-clm-{cfg.member}")
        js = self.nc.jetstream()
        await bus.ensure_topology(js, cfg.nats)
        self.service = ClmService(
            store=MariaDBRequestStore(self.db, actor=f"clm:{cfg.member}"), queue=JetStreamSigningQueue(js),
            profiles=profiles, revocations=MariaDBRevocationStore(self.db, actor=f"clm:{cfg.member}"),
            events=NatsEventPublisher(self.nc),
            clock=self._clock, wait_seconds=cfg.wait_seconds,
        )
        # FastStream logs two lines per message at its log_level; keep those at DEBUG (about 6% of CLM's CPU).
        self.broker = build_broker(cfg.nats.servers, self.service, logger=logging.getLogger("hapki.clm.broker"),
                                   log_level=logging.DEBUG)
        await self.broker.start()
        self._sweeper = asyncio.create_task(self._sweep())
        if cfg.http_listen:
            self.http = await serve(http.build_app(self.service, member=cfg.member), cfg.http_listen)
        log.info("clm %s serving on %s", cfg.member, ", ".join(cfg.nats.servers))

    async def _sweep(self) -> None:
        """The outbox sweep: a scheduler, so only the CLM VIP holder runs it (every member when no VIP is set)."""
        assert self.service is not None
        vip = VipOwnership(self.config.vip) if self.config.vip else None
        try:
            while True:
                await asyncio.sleep(self.config.republish_interval_seconds)
                if vip is not None and not vip.holds():
                    continue
                try:
                    await self.service.republish_stale(timedelta(seconds=self.config.republish_after_seconds))
                except HapkiError as exc:
                    log.warning("outbox sweep failed: %s", exc)
        finally:
            if vip is not None:
                vip.close()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.cleanup()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.broker is not None:
            await self.broker.stop()
        if self.nc is not None:
            await self.nc.close()
        if self.db is not None:
            await self.db.close()
