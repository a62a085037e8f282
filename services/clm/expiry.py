"""The expiry scheduler: records and publishes a `pki.v1.clm.expiring` notice once per certificate per window.

Runs on the CLM VIP holder only (ClmRuntime gates it). Each certificate carries when to look at it next
(requests.expiry_check_at: NULL until first seen, then when its next window opens, or never). One run:
  Step 1 for certificates unseen or due, in batches: record a notice per window each is in and move its
         expiry_check_at on, one transaction a batch (expiry_notices' primary key (issuer, serial, window): a
         second scheduler records nothing new)
  Step 2 publish every notice not yet acknowledged, with Nats-Msg-Id = issuer:serial:window, into stream PKI_EXPIRY
  Step 3 mark the acknowledged ones published
A crash between 1 and 2 leaves notices unpublished: the next run (here or on the new VIP holder) publishes them.
A crash between 2 and 3 republishes them: the stream drops the duplicates (within its duplicate window).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from opentelemetry import trace

from hapki.clm.ports import ExpiryPublisher, InventoryStore
from hapki.contracts.errors import Unavailable

log = logging.getLogger("hapki.clm.expiry")
# Batches one run may take: a backlog (the first run over certificates that predate the scheduler) is worked off
# over several runs instead of one long one.
MAX_BATCHES_PER_RUN = 20
tracer = trace.get_tracer("hapki.clm")


@dataclass(frozen=True)
class ExpiryRun:
    """What one run did: notices recorded now, notices published now (recorded now or earlier)."""

    recorded: int
    published: int


class ExpiryScheduler:
    """One run at a time; the caller decides when (interval) and where (VIP holder)."""

    def __init__(self, *, store: InventoryStore, publisher: ExpiryPublisher, windows_seconds: Sequence[int],
                 clock: Callable[[], datetime], batch: int) -> None:
        self._store, self._publisher, self._clock, self._batch = store, publisher, clock, batch
        self._windows = sorted(set(windows_seconds), reverse=True)

    async def run_once(self) -> ExpiryRun:
        with tracer.start_as_current_span("clm.expiry") as span:
            now = self._clock()
            recorded = 0
            for _ in range(MAX_BATCHES_PER_RUN):
                batch = await self._store.record_expiring(self._windows, now, self._batch)
                recorded += batch.recorded
                if not batch.more:
                    break
            published = await self._publish_pending()
            span.set_attribute("pki.expiry_recorded", recorded)
            span.set_attribute("pki.expiry_published", published)
            if recorded or published:
                log.info("expiry notices: %d recorded, %d published", recorded, published)
            return ExpiryRun(recorded=recorded, published=published)

    async def _publish_pending(self) -> int:
        pending = await self._store.unpublished_notices(self._batch)
        done = []
        try:
            for notice in pending:
                await self._publisher.expiring(notice)
                done.append(notice)
        except Unavailable as exc:
            log.warning("expiry notices: %d of %d published, the rest next run: %s", len(done), len(pending), exc)
        finally:
            # Marked even when a later publish failed: what the stream acknowledged is not sent again.
            await self._store.mark_published(done, self._clock())
        return len(done)
