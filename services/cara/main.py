"""CARA entry point: wires config -> database, HSM pool, bus -> Signer. Start/stop follow the member's role."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import ValidationError

from hapki.cara import http, issuance
from hapki.cara import metrics as cara_metrics
from hapki.cara.audit_sealer import AuditSealer, CheckpointKey
from hapki.cara.config import CaraConfig
from hapki.cara.crl import CrlPublisher
from hapki.cara.issuers import Issuers, Served
from hapki.cara.ocsp import OcspResponder
from hapki.cara.ocsp_cache import OcspCache
from hapki.cara.ocsp_signer import OcspSignerKeeper
from hapki.cara.ports import IssuerRecord
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
        self.issuers: Issuers | None = None  # every issuing CA served: CRLs, OCSP, responder renewal
        self._issuers_task: asyncio.Task[None] | None = None
        self.audit: AuditSealer | None = None
        self._audit_task: asyncio.Task[None] | None = None
        self._unwatch_issuing: Callable[[], None] | None = None
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
        issuer = await store.load_issuer(cfg.issuer)  # the one issued from: pinned, else the default
        revocations = MariaDBRevocationStore(self.db, actor=actor)
        found = await audit_signer(self.db, issuer.name)
        self.hsm = hsm_pool(cfg.hsm)  # read-only sessions: this process cannot create or change HSM objects
        self.hsm.open()
        # Every key this member signs with must be sign-only and non-extractable, or the member does not start.
        await asyncio.to_thread(self.hsm.verify_keys, [issuer.key_id, *([found[0]] if found else [])])
        self.nc = await bus.connect(cfg.nats, name=f"hapki-cara-{cfg.member}", stream=subjects.SIGNING_STREAM)
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
        # Every issuing CA that has not ended: CRLs (published only while the signer is active), OCSP answers and
        # their responder's renewal (hapki.cara.issuers). A revocation event from CLM wakes the publishers (core
        # NATS, no queue group: the active member must see it).
        self.issuers = Issuers(config=cfg, store=store, revocations=revocations, hsm=self.hsm, activity=self.signer,
                               signing=issuer.name, issue_as=self._issue_as, clock=self._clock)
        await self.issuers.refresh()
        self._issuers_task = asyncio.create_task(self.issuers.run())
        await self.nc.subscribe(subjects.CLM_REVOKED, cb=self._on_revoked)
        # Metrics: the signer's role and epoch live; the queue, the database nodes and the intents sampled.
        self._unwatch = cara_metrics.watch_signer(self.signer, cfg.member)
        self._unwatch_issuing = cara_metrics.watch_issuing_ca(self.signer, cfg.member, self._clock)
        every = cfg.metrics.sample_seconds
        self._samplers = [
            asyncio.create_task(metrics.Sampler("signing queue", cara_metrics.queue_sample(js, cfg.member), every).run()),
            asyncio.create_task(metrics.Sampler("database nodes", metrics.database_sample(self.db, cfg.member),
                                                every).run()),
            asyncio.create_task(metrics.Sampler("signing intents",
                                                cara_metrics.intents_sample(store, cfg.member, self._clock),
                                                every).run()),
            asyncio.create_task(metrics.Sampler("database backups",
                                                cara_metrics.backup_sample(self.db, cfg.member, self._clock),
                                                every).run()),
        ]
        if found is None:
            log.warning("issuer %s has no audit signer (run `hapki ca init`): audit checkpoints are not signed",
                        issuer.name)
        checkpoints = None if found is None else CheckpointKey(issuer.name, found[0], self.hsm.private_key(found[0]))
        self.audit = AuditSealer(db=self.db, config=cfg.audit, activity=self.signer, clock=self._clock,
                                 sign=checkpoints)
        self._audit_task = asyncio.create_task(self.audit.run())
        if cfg.http_listen:  # up while passive too: haproxy checks liveness, not the role
            probe = http.HealthProbe(member=cfg.member, signer=self.signer, hsm=self.hsm, db=self.db, nc=self.nc)
            self.http = await serve(http.build_app(probe, crls=revocations, ocsp=self.issuers.router,
                                                   ocsp_max_age=cfg.ocsp.http_max_age_seconds, clock=self._clock),
                                    cfg.http_listen)

    async def _issue_as(self, record: IssuerRecord) -> None:
        """Issue from `record` from now on (a rollover): the signer processes from their next batch, and audit
        checkpoints signed by its audit signer (if it has none yet, by the one before)."""
        cfg = self.config
        assert self.hsm is not None and self.db is not None and self.signers is not None
        found = await audit_signer(self.db, record.name)
        await asyncio.to_thread(self.hsm.verify_keys, [record.key_id, *([found[0]] if found else [])])
        self.signers.use_issuer(record, self.hsm.private_key(record.key_id),
                                issuance.Distribution.at(cfg.public_url, record.name))
        if found is not None and self.audit is not None:
            self.audit.use_key(CheckpointKey(record.name, found[0], self.hsm.private_key(found[0])))
        if self._unwatch_issuing is not None:  # the gauge names the CA issued from
            self._unwatch_issuing()
            assert self.signer is not None
            self._unwatch_issuing = cara_metrics.watch_issuing_ca(self.signer, cfg.member, self._clock)

    def _served(self) -> Served | None:
        """The issuing CA issued from, as served (its CRL publisher, OCSP responder ...)."""
        return None if self.issuers is None else self.issuers.served.get(self.issuers.signing)

    @property
    def crl(self) -> CrlPublisher | None:
        """The CRL publisher of the issuing CA issued from."""
        served = self._served()
        return None if served is None else served.crl

    @property
    def ocsp(self) -> OcspResponder | None:
        """The OCSP responder of the issuing CA issued from (None: it has no responder certificate)."""
        served = self._served()
        return None if served is None else served.responder

    @property
    def ocsp_cache(self) -> OcspCache | None:
        served = self._served()
        return None if served is None else served.cache

    @property
    def ocsp_signers(self) -> OcspSignerKeeper | None:
        """The keeper of the responder certificate of the issuing CA issued from."""
        served = self._served()
        return None if served is None else served.keeper

    async def _on_revoked(self, msg: Msg) -> None:
        """A revocation recorded by CLM: drop the certificate's cached OCSP answers at once, wake the CRL publishers."""
        if self.issuers is None:
            return
        try:
            event = CertificateRevoked.model_validate_json(msg.data)
        except ValidationError as exc:  # not from CLM (bus permissions allow only CLM); the poll still covers it
            log.warning("ignored a malformed %s event: %s", subjects.CLM_REVOKED, str(exc)[:200])
        else:
            self.issuers.invalidate(event.issuer, event.serial)
        self.issuers.wake_crls()

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
        for task in (self._issuers_task, self._audit_task, *self._samplers):
            if task is not None:
                await cancel_and_wait(task)  # again and again: a cancel can be lost (hapki.runtime.tasks)
        if self.issuers is not None:
            await self.issuers.close()
        if self._unwatch_issuing is not None:
            self._unwatch_issuing()
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
