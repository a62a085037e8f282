"""CLM entry point: wires config -> database, bus, profiles -> ClmService -> FastStream responders."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from aiohttp import web
from faststream.nats import NatsBroker
from nats.aio.client import Client

from hapki.clm import http, results
from hapki.clm.app import build_broker
from hapki.clm.config import ClmConfig, RateLimitConfig
from hapki.clm.expiry import ExpiryScheduler
from hapki.clm.inventory_store import MariaDBInventoryStore
from hapki.clm.ratelimit import Rate, RateLimiter
from hapki.clm.queue import JetStreamExpiryPublisher, JetStreamSigningQueue, NatsEventPublisher
from hapki.clm.service import ClmService
from hapki.contracts import subjects
from hapki.clm.store import MariaDBRequestStore, MariaDBRevocationStore
from hapki.contracts.errors import HapkiError
from hapki.runtime import bus, metrics
from hapki.runtime.approval import ApprovalKey
from hapki.runtime.clock import utcnow
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.db import Database
from hapki.runtime.http import serve
from hapki.runtime.migrate import migrate
from hapki.runtime.netlink import VipOwnership
from hapki.runtime.tasks import cancel_and_wait

log = logging.getLogger("hapki.clm")


def rate_limiter(config: RateLimitConfig) -> RateLimiter:
    """The per-requester token buckets of this member, from its config (monotonic time)."""
    return RateLimiter(
        Rate(config.default.per_second, config.default.burst),
        overrides={name: Rate(rule.per_second, rule.burst) for name, rule in config.overrides.items()},
        max_requesters=config.max_requesters, clock=time.monotonic,
    )


class ClmRuntime:
    """One running CLM member: start() wires and starts everything, stop() undoes it."""

    def __init__(self, config: ClmConfig, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self._clock = clock
        self.db: Database | None = None
        self.nc: Client | None = None
        self.broker: NatsBroker | None = None
        self._responders: Client | None = None  # the broker's connection, once started
        self.service: ClmService | None = None
        self.expiry: ExpiryScheduler | None = None
        self._vip: VipOwnership | None = None
        self._schedulers: list[asyncio.Task[None]] = []
        self.http: web.AppRunner | None = None

    async def start(self) -> None:
        cfg = self.config
        profiles = load_profiles(cfg.profiles_file or SHIPPED_PROFILES_PATH)
        approver = ApprovalKey.from_file(cfg.approval_key_file)  # before any connection: a bad key stops the start
        self.db = Database(cfg.database)
        await migrate(self.db)
        self.nc = await bus.connect(cfg.nats, name=f"hapki-clm-{cfg.member}", stream=subjects.SIGNING_STREAM)
        js = self.nc.jetstream()
        await bus.ensure_topology(js, cfg.nats, consumer=False,
                                 streams=(subjects.SIGNING_STREAM, subjects.EXPIRY_STREAM))
        inventory = MariaDBInventoryStore(self.db)
        self.service = ClmService(
            store=MariaDBRequestStore(self.db, actor=f"clm:{cfg.member}", in_flight=cfg.record_transactions_in_flight),
            queue=JetStreamSigningQueue(js),
            profiles=profiles, approver=approver, revocations=MariaDBRevocationStore(self.db, actor=f"clm:{cfg.member}"),
            events=NatsEventPublisher(self.nc), inventory=inventory,
            clock=self._clock, wait_seconds=cfg.wait_seconds, limiter=rate_limiter(cfg.rate_limit), member=cfg.member,
        )
        self.expiry = ExpiryScheduler(store=inventory, publisher=JetStreamExpiryPublisher(js),
                                      windows_seconds=cfg.expiry_windows_seconds, clock=self._clock,
                                      batch=cfg.expiry_batch)
        # CARA's results first (plain subscriptions, hapki.clm.results): subscribed before anything can be requested.
        await results.subscribe(self.nc, self.service)
        # FastStream logs two lines per message at its log_level; keep those at DEBUG (about 6% of CLM's CPU).
        self.broker = build_broker(cfg.nats.servers, self.service, logger=logging.getLogger("hapki.clm.broker"),
                                   log_level=logging.DEBUG, **bus.faststream_options(cfg.nats))
        await self.broker.start()
        # The responders' own connection: moved off a server cut off from the cluster like the service's.
        self._responders = self.broker.connection
        bus.watch(self._responders, cfg.nats, name=f"hapki-clm-{cfg.member}-responders",
                  stream=subjects.SIGNING_STREAM)
        # Schedulers run only on the CLM VIP holder (every member when no VIP is set).
        self._vip = VipOwnership(cfg.vip) if cfg.vip else None
        service, expiry = self.service, self.expiry
        after = timedelta(seconds=cfg.republish_after_seconds)
        self._schedulers = [asyncio.create_task(self._every(
            "outbox sweep", cfg.republish_interval_seconds, lambda: service.republish_stale(after)))]
        self._schedulers.append(asyncio.create_task(metrics.Sampler(
            "database nodes", metrics.database_sample(self.db, cfg.member), cfg.metrics.sample_seconds).run()))
        if cfg.expiry_windows_seconds:
            self._schedulers.append(asyncio.create_task(self._every(
                "expiry scheduler", cfg.expiry_interval_seconds, expiry.run_once)))
        if cfg.http_listen:
            app = http.build_app(self.service, member=cfg.member, trusted_proxies=cfg.trusted_proxies)
            self.http = await serve(app, cfg.http_listen)
        log.info("clm %s serving on %s", cfg.member, ", ".join(cfg.nats.servers))

    def holds_vip(self) -> bool:
        """Whether this member may run the schedulers now: it holds the CLM VIP, or no VIP is configured."""
        return self._vip is None or self._vip.holds()

    async def _every(self, name: str, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        """Run `job` every `interval` seconds while this member holds the VIP; a failed run is retried next time."""
        while True:
            await asyncio.sleep(interval)
            if not self.holds_vip():
                continue
            try:
                await job()
            except HapkiError as exc:
                log.warning("%s failed: %s", name, exc)

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.cleanup()
        for task in self._schedulers:
            await cancel_and_wait(task)  # a cancel lost inside a job must not hang the stop
        self._schedulers = []
        if self._vip is not None:
            self._vip.close()
            self._vip = None
        if self.broker is not None:
            if self._responders is not None:
                await bus.unwatch(self._responders)
                self._responders = None
            await self.broker.stop()
        if self.nc is not None:
            await bus.close(self.nc)
        if self.db is not None:
            await self.db.close()
