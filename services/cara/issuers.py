"""The issuing CAs a CARA member serves, and the one it issues from.

Every issuing CA stored (table `issuers`) whose certificate has not ended is served on every member: its CRLs
(published while the member is active), OCSP answers about what it issued (every member), and its OCSP responder's
certificate renewal (hapki.cara.ocsp_signer); once its certificate ends (and with it everything it issued) it is no
longer served. One of them is issued from: the one the config pins (`issuer`), else
the default. `hapki ca rollover` stores a new issuing CA with its OCSP responder and audit signer, then makes it the
default; each member reads the issuers every `issuers_check_seconds`, serves a new one, and when the default moved
tells its signer processes (from their next batch) and its audit sealer to use it. The CA before keeps answering
OCSP and publishing CRLs for what it issued, until its own certificate ends (and with it everything it issued).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hapki.cara.config import CaraConfig
from hapki.cara.crl import CrlPublisher
from hapki.cara.ocsp import OcspResponder, OcspRouter
from hapki.cara.ocsp_cache import OcspCache
from hapki.cara.ocsp_signer import OcspSignerKeeper
from hapki.cara.ports import IssuerRecord
from hapki.cara.revocation_store import ROOT_CRL_ISSUER, MariaDBRevocationStore
from hapki.cara.role import Activity
from hapki.cara.store import MariaDBSigningStore
from hapki.contracts.errors import HapkiError
from hapki.runtime.hsm import HSMPool
from hapki.runtime.metrics import State
from hapki.runtime.tasks import cancel_and_wait

__all__ = ["Issuers", "Served"]

log = logging.getLogger("hapki.cara.issuers")


@dataclass
class Served:
    """One issuing CA on this member: its CRL publisher and, once it has an OCSP responder, the responder's parts."""

    record: IssuerRecord
    crl: CrlPublisher
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    responder: OcspResponder | None = None
    cache: OcspCache | None = None
    keeper: OcspSignerKeeper | None = None
    cache_task: asyncio.Task[None] | None = None  # the cache's revocation poll (one of `tasks`)
    unwatch: Callable[[], None] | None = None
    warned: bool = False  # "no OCSP signer" said once, not at every check


class Issuers:
    """Serves every issuing CA that has not ended; calls `issue_as` when the one to issue from changes."""

    def __init__(self, *, config: CaraConfig, store: MariaDBSigningStore, revocations: MariaDBRevocationStore,
                 hsm: HSMPool, activity: Activity, signing: str, issue_as: Callable[[IssuerRecord], Awaitable[None]],
                 clock: Callable[[], datetime]) -> None:
        self._config, self._store, self._revocations, self._hsm = config, store, revocations, hsm
        self._activity, self._issue_as, self._clock = activity, issue_as, clock
        self.signing = signing  # the name of the issuing CA this member issues from now
        self.served: dict[str, Served] = {}
        self.router = OcspRouter()  # the HTTP edge's OCSP: every served issuer with a responder
        self.arl_next_update: datetime | None = None  # of the root's newest CRL, read at each refresh
        self._arl_gauge = {"pki.member": config.member}
        State.of("hapki.ca.arl.remaining").watch(self._arl_gauge, self._arl_remaining)

    def _arl_remaining(self) -> float | None:
        after = self.arl_next_update
        return None if after is None else (after - self._clock()).total_seconds()

    async def refresh(self) -> None:
        """Read the issuers: serve what is new (or has just got its OCSP responder), switch if the default moved."""
        records, default = await self._store.load_issuers()
        arl = await self._revocations.latest_crl(ROOT_CRL_ISSUER, delta=False)
        self.arl_next_update = None if arl is None else arl.next_update
        now = self._clock()
        for record in records:
            await self._serve(record, now)
        for name, served in list(self.served.items()):
            if name != self.signing and served.record.certificate.not_valid_after_utc <= now:
                await self._retire(name)
        for record in records:
            served = self.served.get(record.name)
            if record.revoked_at is not None and served is not None and served.responder is not None:
                served.responder.ca_revoked(record.revoked_at, record.revocation_reason or "unspecified")
            if record.revoked_at is not None and record.name == self.signing:
                log.error("%s issues from %s, which its root revoked at %s: roll over (`hapki ca rollover`) or "
                          "unpin it (`issuer`)", self._config.member, record.name, record.revoked_at.isoformat())
        wanted = self._config.issuer or default
        if wanted is not None and wanted != self.signing:
            record = next((r for r in records if r.name == wanted), None)
            if record is None:
                return  # a pinned issuer that does not exist stopped the start already (load_issuer)
            await self._issue_as(record)
            log.info("%s issues from %s from now on (was %s)", self._config.member, wanted, self.signing)
            self.signing = wanted

    async def run(self) -> None:
        """refresh() every `issuers_check_seconds` until cancelled; a failure is logged and retried next time."""
        every = self._config.issuers_check_seconds
        while True:
            await asyncio.sleep(every)
            try:
                await self.refresh()
            except (HapkiError, ValueError) as exc:  # database down, an HSM key missing or unsafe: next time
                log.warning("issuer check failed: %s; retrying in %.0f s", exc, every)
            except Exception:  # a bug must not end the checks (nor the service): logged with its traceback
                log.exception("bug in the issuer check; retrying in %.0f s", every)

    def wake_crls(self) -> None:
        """A revocation was recorded: every publisher checks at once (the one of its issuer publishes)."""
        for served in self.served.values():
            served.crl.wake()

    def invalidate(self, issuer: str, serial: str) -> None:
        """Drop the cached OCSP answers about a certificate just revoked."""
        served = self.served.get(issuer)
        if served is not None and served.cache is not None:
            served.cache.invalidate(serial)

    async def close(self) -> None:
        State.of("hapki.ca.arl.remaining").discard(self._arl_gauge)
        for name in list(self.served):
            await self._retire(name, ended=False)

    async def _retire(self, name: str, *, ended: bool = True) -> None:
        """Stop serving an issuing CA: its certificate ended, and with it everything it issued (or at close)."""
        served = self.served.pop(name)
        if served.responder is not None:
            self.router.remove(served.responder)
        for task in served.tasks:
            await cancel_and_wait(task)  # again and again: a cancel can be lost (hapki.runtime.tasks)
        if served.unwatch is not None:
            served.unwatch()
        if served.cache is not None:
            await served.cache.close()
        if ended:
            log.info("issuing CA %s ended %s: no more CRLs or OCSP answers about it", name,
                     served.record.certificate.not_valid_after_utc.isoformat())

    async def _serve(self, record: IssuerRecord, now: datetime) -> None:
        cfg = self._config
        served = self.served.get(record.name)
        if served is None:
            if record.certificate.not_valid_after_utc <= now:
                return  # ended, and so has everything it issued: nothing to answer for
            # Every key this member signs with must be sign-only and non-extractable, or it is not used.
            await asyncio.to_thread(self._hsm.verify_keys, [record.key_id])
            crl = CrlPublisher(store=self._revocations, issuer=record, issuer_key=self._hsm.private_key(record.key_id),
                               member=cfg.member, config=cfg.crl, activity=self._activity, clock=self._clock)
            served = self.served[record.name] = Served(record, crl, [asyncio.create_task(crl.run())])
            log.info("%s serves issuing CA %s (CRLs, OCSP)", cfg.member, record.name)
        if served.responder is not None:
            return
        signer = await self._revocations.ocsp_signer(record.name)
        if signer is None:
            if not served.warned:
                log.warning("issuer %s has no OCSP signer (run `hapki ca init`): OCSP answers about it unauthorized",
                            record.name)
                served.warned = True
            return
        await asyncio.to_thread(self._hsm.verify_keys, [signer.key_id])
        # Signed responses kept per certificate; its revocation poll runs on every member (each serves OCSP).
        served.cache = OcspCache(
            feed=self._revocations, issuer=record.name, entries=cfg.ocsp.cache_entries,
            refresh_after=cfg.ocsp.refresh_after_seconds, poll=cfg.ocsp.revocation_poll_seconds,
            staleness=cfg.ocsp.max_staleness_seconds, monotonic=time.monotonic,
        )
        served.responder = OcspResponder(
            store=self._revocations, issuer=record, signer_cert=signer.certificate,
            signer_key=self._hsm.private_key(signer.key_id), validity_seconds=cfg.ocsp.validity_seconds,
            clock=self._clock, cache=served.cache, echo_nonce=cfg.ocsp.echo_nonce,
        )
        # Every member signs with the newest responder certificate; the active one renews it before it expires.
        served.keeper = OcspSignerKeeper(
            store=self._revocations, issuer=record, issuing_key=self._hsm.private_key(record.key_id),
            responder=served.responder, signer_key=self._hsm.private_key, activity=self._activity,
            member=cfg.member, renew_before=timedelta(days=cfg.ocsp.signer_renew_before_days),
            check_seconds=cfg.ocsp.signer_check_seconds, clock=self._clock, key_id=signer.key_id,
            check_keys=self._hsm.verify_keys,
        )
        served.unwatch = served.keeper.watch_expiry()
        served.cache_task = asyncio.create_task(served.cache.run())
        served.tasks += [served.cache_task, asyncio.create_task(served.keeper.run())]
        self.router.add(served.responder)
