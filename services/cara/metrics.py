"""CARA's own metrics: the signer's role and epoch (read live at each scrape) and the signing queue (sampled).

Instruments are declared in hapki.runtime.metrics.CATALOG; this module only wires CARA's objects to them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.errors import Error as NatsError

from hapki.cara.role import Activity
from hapki.contracts import subjects
from hapki.contracts.errors import Unavailable
from hapki.runtime.metrics import State

__all__ = ["queue_sample", "watch_signer"]


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


def queue_sample(js: JetStreamContext, member: str) -> Callable[[], Awaitable[None]]:
    """A sample of the signing consumer: requests waiting for delivery, and delivered but not acknowledged."""
    attributes = {"pki.member": member}
    pending, ack_pending = State.of("hapki.signing.queue.pending"), State.of("hapki.signing.queue.ack_pending")

    async def sample() -> None:
        try:
            info = await js.consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER, timeout=2.0)
        except (NatsError, TimeoutError) as exc:
            pending.discard(attributes)
            ack_pending.discard(attributes)
            raise Unavailable(f"signing consumer info: {type(exc).__name__}: {exc}") from exc
        pending.set(info.num_pending or 0, attributes)
        ack_pending.set(info.num_ack_pending or 0, attributes)

    return sample
