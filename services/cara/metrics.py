"""CARA's own metrics: the signer's role and epoch (read live at each scrape), the signing queue and the reserved
signing intents (sampled).

Instruments are declared in hapki.runtime.metrics.CATALOG; this module only wires CARA's objects to them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from nats.js import JetStreamContext
from nats.errors import Error as NatsError

from hapki.cara.ports import SigningStore
from hapki.cara.role import Activity
from hapki.cara.signer import Signer
from hapki.contracts import subjects
from hapki.contracts.errors import Unavailable
from hapki.runtime import backup
from hapki.runtime.db import Database
from hapki.runtime.metrics import State

__all__ = ["intents_sample", "queue_sample", "watch_issuing_ca", "watch_signer"]


def watch_signer(signer: Activity, member: str) -> Callable[[], None]:
    """Export the signer's active state and epoch under `member`; returns the undo (for stop())."""
    attributes = {"pki.member": member}
    active, epoch = State.of("hapki.cara.signer.active"), State.of("hapki.cara.signer.epoch")
    active.watch(attributes, lambda: float(signer.active))
    epoch.watch(attributes, lambda: signer.epoch)

    def undo() -> None:
        active.discard(attributes)
        epoch.discard(attributes)

    return undo


def watch_issuing_ca(signer: Signer, member: str, clock: Callable[[], datetime]) -> Callable[[], None]:
    """Export the seconds left of the issuing CA `signer` issues from now (`hapki.ca.certificate.remaining`,
    certificate issuing_ca, pki.issuer its name: which CA each member issues from); returns the undo."""
    gauge = State.of("hapki.ca.certificate.remaining")
    identity = signer.identity  # a rollover swaps the signer's identity: the caller watches again (pki.issuer)
    attributes = {"pki.member": member, "pki.certificate": "issuing_ca", "pki.issuer": identity.issuer.name}
    gauge.watch(attributes, lambda: (identity.cert.not_valid_after_utc - clock()).total_seconds())
    return lambda: gauge.discard(attributes)


def queue_sample(js: JetStreamContext, member: str) -> Callable[[], Awaitable[None]]:
    """A sample of the signing consumer: requests waiting for delivery, and delivered but not acknowledged; and of
    the signing stream: its replicas not current (alert HapkiBusReplicaBehind)."""
    attributes = {"pki.member": member}
    pending, ack_pending = State.of("hapki.signing.queue.pending"), State.of("hapki.signing.queue.ack_pending")
    behind = State.of("hapki.bus.replicas.behind")

    async def sample() -> None:
        try:
            info = await js.consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER, timeout=2.0)
            stream = await js.stream_info(subjects.SIGNING_STREAM)
        except (NatsError, TimeoutError) as exc:
            for gauge in (pending, ack_pending, behind):
                gauge.discard(attributes)
            raise Unavailable(f"signing consumer info: {type(exc).__name__}: {exc}") from exc
        pending.set(info.num_pending or 0, attributes)
        ack_pending.set(info.num_ack_pending or 0, attributes)
        replicas = stream.cluster.replicas if stream.cluster else None
        behind.set(sum(1 for r in replicas or [] if not r.current or r.offline), attributes)

    return sample


def backup_sample(db: Database, member: str, clock: Callable[[], datetime]) -> Callable[[], Awaitable[None]]:
    """A sample of the newest database backup's age (`hapki db backup`; alert HapkiDatabaseBackupStale). Absent
    while none was made, and when the database did not answer."""
    attributes = {"pki.member": member}
    age = State.of("hapki.db.backup.age")

    async def sample() -> None:
        try:
            taken = await backup.newest(db)
        except Unavailable:
            age.discard(attributes)
            raise
        if taken is None:
            age.discard(attributes)
        else:
            age.set(max(0.0, (clock() - taken).total_seconds()), attributes)

    return sample


def intents_sample(store: SigningStore, member: str, clock: Callable[[], datetime]) -> Callable[[], Awaitable[None]]:
    """A sample of the signing intents still reserved: how many, and how old the oldest is (0 when none).

    The invariant "every signature is accounted for" as a figure an operator can alert on: an intent stays
    reserved for milliseconds (reserve, C_Sign, store) unless its signer died between the signature and the
    store; the next epoch or the request's next attempt resolves it (abandoned, audited). Unknown (the database
    did not answer): the figures are dropped, not left at their last value.
    """
    attributes = {"pki.member": member}
    reserved = State.of("hapki.signing.intents.reserved")
    oldest_age = State.of("hapki.signing.intents.oldest_reserved_age")

    async def sample() -> None:
        try:
            count, oldest = await store.reserved_intents()
        except Unavailable:
            reserved.discard(attributes)
            oldest_age.discard(attributes)
            raise
        reserved.set(count, attributes)
        oldest_age.set(0.0 if oldest is None else max(0.0, (clock() - oldest).total_seconds()), attributes)

    return sample
