"""CRLs: building a full or delta CRL (pure) and the publisher that keeps them current on the active member.

Policy:
- One CRL number sequence per issuer, shared by full and delta CRLs (RFC 5280 5.2.3), allocated inside the fenced
  transaction that stores the CRL (revocation_store.publish_crl): strictly increasing across failovers.
- A full CRL lists every revocation of the issuer (entries are never dropped, also after expiry); a delta CRL
  (Delta CRL Indicator = base CRL number, critical) lists exactly the revocations not on its base full CRL.
- A revocation (the `pki.v1.clm.revoked` event, or the poll finding a revocation on no CRL yet) makes a new full
  CRL and then a new delta within seconds, so relying parties that fetch only full CRLs learn it at once too.
  Otherwise: a full CRL every `full_interval_seconds`, a delta every `delta_interval_seconds`. The schedule is
  read from the database (latest thisUpdate), so it carries over a failover.
- Reason `unspecified` is not encoded (RFC 5280 5.3.1 SHOULD be absent; BR 7.2.2 MUST).
Only the active member publishes: the publisher's loop runs on every member and does nothing while the signer
is passive; the epoch fence refuses a CRL from a member that lost its role meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from opentelemetry import trace

from hapki.cara.config import CrlConfig
from hapki.cara.ports import CrlEntry, CrlRecord, CrlSchedule, IssuerRecord
from hapki.cara.role import Activity, run_while_active
from hapki.runtime import metrics

log = logging.getLogger("hapki.cara.crl")
tracer = trace.get_tracer("hapki.cara")
_SECONDS = metrics.histogram("hapki.crl.generation.duration")


def build_crl(
    entries: list[CrlEntry],
    *,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    number: int,
    base: int | None,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """Build and sign (through `issuer_key`, i.e. the HSM) a full CRL, or a delta CRL when `base` is given."""
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False),
        (x509.CRLNumber(number), False),
    ]
    if base is not None:
        extensions.append((x509.DeltaCRLIndicator(base), True))
    revoked: list[x509.RevokedCertificate] = []
    for entry in entries:
        item = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(entry.revoked_at.replace(microsecond=0))
        )
        if entry.reason != x509.ReasonFlags.unspecified.name:
            item = item.add_extension(x509.CRLReason(x509.ReasonFlags[entry.reason]), critical=False)
        revoked.append(item.build())
    # Everything through the constructor: add_revoked_certificate copies the whole list on every call, which is
    # quadratic (20 s for 100,000 entries).
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer_cert.subject, last_update=this_update, next_update=next_update,
        extensions=[x509.Extension(value.oid, critical, value) for value, critical in extensions],
        revoked_certificates=revoked,
    )
    hash_algorithm = hashes.SHA384() if issuer_key.curve.key_size >= 384 else hashes.SHA256()
    return builder.sign(issuer_key, hash_algorithm)


class CrlStore(Protocol):
    """The CRL calls of the revocation store (revocation_store.MariaDBRevocationStore)."""

    async def publish_crl(self, issuer: str, *, delta: bool, epoch: int, member: str, now: datetime,
                          build: object) -> CrlRecord: ...

    async def crl_schedule(self, issuer: str) -> CrlSchedule: ...


class CrlPublisher:
    """Keeps the issuer's full and delta CRLs current while this member is active."""

    def __init__(
        self,
        *,
        store: CrlStore,
        issuer: IssuerRecord,
        issuer_key: ec.EllipticCurvePrivateKey,
        member: str,
        config: CrlConfig,
        activity: Activity,
        clock: Callable[[], datetime],
    ) -> None:
        self._store, self._issuer, self._key = store, issuer, issuer_key
        self._issuer_cert = issuer.certificate
        self._member, self._config, self._activity, self._clock = member, config, activity, clock
        self._wake = asyncio.Event()
        self.published: list[CrlRecord] = []  # by this process, newest last (tests and health)

    def _measure(self, kind: str, record: CrlRecord, seconds: float) -> None:
        attributes = {"pki.member": self._member, "pki.issuer": self._issuer.name, "crl.kind": kind}
        _SECONDS.record(seconds, attributes)
        metrics.State.of("hapki.crl.number").set(record.number, attributes)
        metrics.State.of("hapki.crl.size").set(len(record.der), attributes)
        metrics.State.of("hapki.crl.entries").set(record.entries, attributes)

    def wake(self) -> None:
        """A revocation was recorded: check at once instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """The loop: on every member, but it publishes only while the signer is active."""

        async def woken_or_polled() -> None:
            try:  # asyncio.timeout: a cancel is never lost to a wake at the same moment (hapki.runtime.netlink)
                async with asyncio.timeout(self._config.poll_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

        await run_while_active(self._activity, self.tick, wait=woken_or_polled, what="CRL publication", logger=log)

    async def tick(self, epoch: int) -> list[CrlRecord]:
        """Publish what is due now: a full CRL (then a delta) on revocations or schedule, else a delta if due."""
        state = await self._store.crl_schedule(self._issuer.name)
        now = self._clock()
        full_every = timedelta(seconds=self._config.full_interval_seconds)
        delta_every = timedelta(seconds=self._config.delta_interval_seconds)
        if state.unlisted or state.full_at is None or now - state.full_at >= full_every:
            return [await self.publish(epoch, delta=False), await self.publish(epoch, delta=True)]
        if state.delta_at is None or now - state.delta_at >= delta_every:
            return [await self.publish(epoch, delta=True)]
        return []

    async def publish(self, epoch: int, *, delta: bool) -> CrlRecord:
        """Sign and store one CRL under `epoch` (FencedOut if it is not current any more)."""
        kind = "delta" if delta else "full"
        with tracer.start_as_current_span("cara.crl", attributes={"pki.crl_kind": kind, "pki.member": self._member,
                                                                   "pki.issuer": self._issuer.name}) as span:
            validity = self._config.delta_validity_seconds if delta else self._config.full_validity_seconds
            began = time.perf_counter()

            async def build(number: int, base: int | None, entries: list[CrlEntry]) -> tuple[bytes, datetime, datetime]:
                this_update = self._clock().replace(microsecond=0)
                next_update = this_update + timedelta(seconds=validity)
                crl = await asyncio.to_thread(
                    build_crl, entries, issuer_cert=self._issuer_cert, issuer_key=self._key, number=number,
                    base=base, this_update=this_update, next_update=next_update,
                )
                return crl.public_bytes(Encoding.DER), this_update, next_update

            record = await self._store.publish_crl(self._issuer.name, delta=delta, epoch=epoch, member=self._member,
                                                   now=self._clock(), build=build)
            span.set_attribute("pki.crl_number", record.number)
            span.set_attribute("pki.crl_entries", record.entries)
            log.info("published %s CRL %d of %s (%d entries, epoch %d)", kind, record.number, self._issuer.name,
                     record.entries, epoch)
            self._measure(kind, record, time.perf_counter() - began)
            self.published.append(record)
            del self.published[:-100]
            return record
