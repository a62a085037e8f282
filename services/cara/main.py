"""CARA entry point: wires config -> database, HSM pool, bus -> Signer. Start/stop follow the member's role."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import ValidationError

from hapki.cara import http, issuance
from hapki.cara import metrics as cara_metrics
from hapki.cara.audit_sealer import AuditSealer, CheckpointKey
from hapki.cara.config import CaraConfig
from hapki.cara.crl import CrlPublisher
from hapki.cara.ocsp import OcspResponder
from hapki.cara.ocsp_cache import OcspCache
from hapki.cara.ocsp_signer import OcspSignerKeeper
from hapki.cara.revocation_store import MariaDBRevocationStore
from hapki.cara.role import RoleSupervisor
from hapki.cara.signer import Signer
from hapki.cara.signer_processes import SignerProcesses
from hapki.cara.store import MariaDBSigningStore
from hapki.contracts import subjects
from hapki.contracts.models import CertificateRevoked
from hapki.runtime import bus, metrics
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.audit import audit_signer
from hapki.runtime.clock import utcnow
from hapki.runtime.config import HSMConfig
from hapki.runtime.db import Database
from hapki.runtime.faults import FailPoints
from hapki.runtime.hsm import HSMMemberConfig, HSMPool
from hapki.runtime.http import serve
from hapki.runtime.migrate import migrate
from hapki.runtime.netlink import VipOwnership
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.tasks import cancel_and_wait

log = logging.getLogger("hapki.cara")


def hsm_pool(config: HSMConfig, *, rw: bool = False) -> HSMPool:
    """The HSM pool of a config section (members tried in order); read-only sessions unless `rw` (ceremonies)."""
    members = [
        HSMMemberConfig(
            name=m.name, module_path=str(m.module_path), token_label=m.token_label, pin_file=m.pin_file,
            softhsm_conf=m.softhsm_conf,
        )
        for m in config.members
    ]
    return HSMPool(members, retry_after_s=config.retry_down_after_seconds, rw=rw)


class CaraRuntime:
    """One CARA member: connections, HSM sessions and the signer. `start()` makes it active."""

    def __init__(self, config: CaraConfig, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self._clock = clock
        self.db: Database | None = None
        self.nc: Client | None = None
        self.hsm: HSMPool | None = None
        self.signer: Signer | None = None
        self.signers: SignerProcesses | None = None  # the signer and its worker processes, driven as one
        self.role: RoleSupervisor | None = None
        self._role_task: asyncio.Task[None] | None = None
        self._ownership: VipOwnership | None = None
        self.http: web.AppRunner | None = None
        self.crl: CrlPublisher | None = None
        self._crl_task: asyncio.Task[None] | None = None
        self.audit: AuditSealer | None = None
        self._audit_task: asyncio.Task[None] | None = None
        self.ocsp_cache: OcspCache | None = None
        self._ocsp_task: asyncio.Task[None] | None = None
        self.ocsp: OcspResponder | None = None
        self.ocsp_signers: OcspSignerKeeper | None = None  # the responder's newest certificate; renewal
        self._ocsp_signer_task: asyncio.Task[None] | None = None
        self._unwatch_expiry: Callable[[], None] | None = None
        self._samplers: list[asyncio.Task[None]] = []
        self._unwatch: Callable[[], None] | None = None

    async def open(self) -> None:
        """Connect everything; the signer stays passive until start()."""
        cfg = self.config
        # Local checks first: a bad approval key or profiles file stops the start before anything connects.
        approvals = ApprovalVerifier.from_files(cfg.approval_public_keys)
        profiles = load_profiles(cfg.profiles_file or SHIPPED_PROFILES_PATH)
        self.db = Database(cfg.database)
        await migrate(self.db)
        actor = f"cara:{cfg.member}"
        store = MariaDBSigningStore(self.db, actor=actor)
        issuer = await store.load_issuer(cfg.issuer)
        revocations = MariaDBRevocationStore(self.db, actor=actor)
        found = await audit_signer(self.db, issuer.name)
        ocsp_signer = await revocations.ocsp_signer(issuer.name)
        self.hsm = hsm_pool(cfg.hsm)  # read-only sessions: this process cannot create or change HSM objects
        self.hsm.open()
        # Every key this member signs with must be sign-only and non-extractable, or the member does not start.
        key_ids = [issuer.key_id, *(key_id for key_id in (found and found[0], ocsp_signer and ocsp_signer.key_id)
                                    if key_id)]
        await asyncio.to_thread(self.hsm.verify_keys, key_ids)
        self.nc = await bus.connect(cfg.nats, name=f"hapki-cara-{cfg.member}")
        js = self.nc.jetstream()
        await bus.ensure_topology(js, cfg.nats, streams=(subjects.SIGNING_STREAM,))
        self.signer = Signer(
            nc=self.nc, js=js, store=store, issuer=issuer, issuer_key=self.hsm.private_key(issuer.key_id),
            member=cfg.member, config=cfg.signer, clock=self._clock, approvals=approvals, profiles=profiles,
            faults=FailPoints(),
            distribution=issuance.Distribution.at(cfg.public_url, issuer.name),
        )
        # Several signer processes ([signer] processes > 1): the workers start now and stay passive until start().
        self.signers = SignerProcesses(self.signer, cfg)
        await self.signers.open()
        # CRLs: the publisher loop runs on every member and publishes only while the signer is active; a
        # revocation event from CLM wakes it (core NATS, no queue group: the active member must see it).
        self.crl = CrlPublisher(
            store=revocations, issuer=issuer, issuer_key=self.hsm.private_key(issuer.key_id), member=cfg.member,
            config=cfg.crl, activity=self.signer, clock=self._clock,
        )
        await self.nc.subscribe(subjects.CLM_REVOKED, cb=self._on_revoked)
        # Metrics: the signer's role and epoch live; the queue, the database nodes and the intents sampled.
        self._unwatch = cara_metrics.watch_signer(self.signer, cfg.member)
        every = cfg.metrics.sample_seconds
        self._samplers = [
            asyncio.create_task(metrics.Sampler("signing queue", cara_metrics.queue_sample(js, cfg.member), every).run()),
            asyncio.create_task(metrics.Sampler("database nodes", metrics.database_sample(self.db, cfg.member),
                                                every).run()),
            asyncio.create_task(metrics.Sampler("signing intents",
                                                cara_metrics.intents_sample(store, cfg.member, self._clock),
                                                every).run()),
        ]
        self._crl_task = asyncio.create_task(self.crl.run())
        if found is None:
            log.warning("issuer %s has no audit signer (run `hapki ca init`): audit checkpoints are not signed",
                        issuer.name)
        checkpoints = None if found is None else CheckpointKey(issuer.name, found[0], self.hsm.private_key(found[0]))
        self.audit = AuditSealer(db=self.db, config=cfg.audit, activity=self.signer, clock=self._clock,
                                 sign=checkpoints)
        self._audit_task = asyncio.create_task(self.audit.run())
        ocsp = None
        if ocsp_signer is None:
            log.warning("issuer %s has no OCSP signer (run `hapki ca init`): OCSP answers unauthorized", issuer.name)
        else:
            # Signed responses kept per certificate; its revocation poll runs on every member (each serves OCSP).
            self.ocsp_cache = OcspCache(
                feed=revocations, issuer=issuer.name, entries=cfg.ocsp.cache_entries,
                refresh_after=cfg.ocsp.refresh_after_seconds, poll=cfg.ocsp.revocation_poll_seconds,
                staleness=cfg.ocsp.max_staleness_seconds, monotonic=time.monotonic,
            )
            self._ocsp_task = asyncio.create_task(self.ocsp_cache.run())
            ocsp = self.ocsp = OcspResponder(
                store=revocations, issuer=issuer, signer_cert=ocsp_signer.certificate,
                signer_key=self.hsm.private_key(ocsp_signer.key_id), validity_seconds=cfg.ocsp.validity_seconds,
                clock=self._clock, cache=self.ocsp_cache, echo_nonce=cfg.ocsp.echo_nonce,
            )
            # Every member signs with the newest responder certificate; the active one renews it before it expires.
            self.ocsp_signers = OcspSignerKeeper(
                store=revocations, issuer=issuer, issuing_key=self.hsm.private_key(issuer.key_id), responder=ocsp,
                signer_key=self.hsm.private_key, activity=self.signer, member=cfg.member,
                renew_before=timedelta(days=cfg.ocsp.signer_renew_before_days),
                check_seconds=cfg.ocsp.signer_check_seconds, clock=self._clock,
            )
            self._unwatch_expiry = self.ocsp_signers.watch_expiry()
            self._ocsp_signer_task = asyncio.create_task(self.ocsp_signers.run())
        if cfg.http_listen:  # up while passive too: haproxy checks liveness, not the role
            probe = http.HealthProbe(member=cfg.member, signer=self.signer, hsm=self.hsm, db=self.db, nc=self.nc)
            self.http = await serve(http.build_app(probe, crls=revocations, ocsp=ocsp,
                                                   ocsp_max_age=cfg.ocsp.http_max_age_seconds, clock=self._clock),
                                    cfg.http_listen)

    async def _on_revoked(self, msg: Msg) -> None:
        """A revocation recorded by CLM: drop the certificate's cached OCSP answers at once, wake the CRL publisher."""
        if self.ocsp_cache is not None:
            try:
                event = CertificateRevoked.model_validate_json(msg.data)
            except ValidationError as exc:  # not from CLM (bus permissions allow only CLM); the poll still covers it
                log.warning("ignored a malformed %s event: %s", subjects.CLM_REVOKED, str(exc)[:200])
            else:
                self.ocsp_cache.invalidate(event.serial)
        if self.crl is not None:
            self.crl.wake()

    async def start(self) -> int:
        """Open, then sign: always (no VIP configured: returns the epoch) or only while holding the VIP (0)."""
        if self.signers is None:
            await self.open()
        assert self.signers is not None
        if self.config.vip is None:
            return await self.signers.start()
        self._ownership = VipOwnership(self.config.vip, announced=True)
        self.role = RoleSupervisor(self._ownership, self.signers, poll_seconds=self.config.vip_poll_seconds,
                                   recheck_seconds=self.config.vip_recheck_seconds, member=self.config.member)
        await self.role.step()
        self._role_task = asyncio.create_task(self.role.run())
        return self.signers.epoch or 0

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.cleanup()
        if self._role_task is not None:
            await cancel_and_wait(self._role_task)
        if self._ownership is not None:
            self._ownership.close()
            self._ownership = None
        if self._unwatch is not None:
            self._unwatch()
        if self._unwatch_expiry is not None:
            self._unwatch_expiry()
        for task in (self._crl_task, self._audit_task, self._ocsp_task, self._ocsp_signer_task, *self._samplers):
            if task is not None:
                await cancel_and_wait(task)  # again and again: a cancel can be lost (hapki.runtime.tasks)
        if self.ocsp_cache is not None:
            await self.ocsp_cache.close()
        if self.signers is not None:
            await self.signers.stop()
            await self.signers.close()
        elif self.signer is not None:
            await self.signer.stop()
        if self.nc is not None:
            await bus.close(self.nc)
        if self.hsm is not None:
            self.hsm.close()
        if self.db is not None:
            await self.db.close()
