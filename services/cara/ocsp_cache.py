"""Signed OCSP responses produced once and served many times (RFC 5019 2.2, RFC 6960 2.4), dropped on revocation.

Why: a response read from the database and signed by the HSM per request costs ~1 ms of CPU, which caps a member
at ~1,500 responses/s. Relying parties ask about the same certificates again and again, and a response is valid
until its nextUpdate, so a member produces one response per (certificate, CertID hash algorithm), keeps it, and
produces it again when it grows old (`refresh_after` seconds, in the background) or when the certificate is revoked.

What a cached answer may miss, and the bounds (docs/ARCHITECTURE.md, "OCSP responses from a cache"):
- Step 1, the event: CLM publishes pki.v1.clm.revoked after the revocation commits; every member drops that
  serial's cached answers at once (`invalidate`). Core NATS delivers at most once: a member cut off the bus misses it.
- Step 2, the poll (`sync`, every `poll` seconds): the revocations recorded since the last poll, read from the
  database (`RevocationFeed`), are dropped too. It also catches a revocation a Galera node had not applied yet when
  the event made the member read the status again.
- Step 3, the trust bound: cached answers are used only while the last successful poll began at most `staleness`
  seconds ago. A member that cannot read the database (or whose polls hang) answers every request live, which
  needs the database (tryLater without it), so it never serves a stale `good` for longer than that.
- A production that read the status before an invalidation of its serial is returned to its own callers but not
  kept (unless it says revoked: a revocation is final), so a read racing a revocation cannot be cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from opentelemetry import context

from hapki.contracts.errors import HapkiError
from hapki.runtime import telemetry

log = logging.getLogger("hapki.cara.ocsp_cache")

# A production whose status read began longer ago than this is not kept (its read is older than what
# invalidations are remembered for); a production takes a database read and one signature, milliseconds normally.
PRODUCTION_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Signed:
    """A signed OCSP response and the certificate status it states (cached ones carry no nonce)."""

    der: bytes
    status: str  # good, revoked, unknown
    this_update: datetime
    next_update: datetime


@dataclass(frozen=True)
class Cached:
    """A signed response and when (monotonic seconds) the status it states was read: just before the read began."""

    signed: Signed
    read_at: float


class RevocationFeed(Protocol):
    async def revocations_since(self, issuer: str, after: int | None) -> tuple[list[str], int]:
        """(serials revoked since watermark `after` (all of them may be returned again), the new watermark);
        with `after` None only the watermark (nothing to compare with yet)."""
        ...


Produce = Callable[[], Awaitable[Signed]]


class OcspCache:
    """Signed responses of one issuer, by serial (hex) and CertID hash algorithm name; LRU-bounded."""

    def __init__(self, *, feed: RevocationFeed, issuer: str, entries: int, refresh_after: float, poll: float,
                 staleness: float, monotonic: Callable[[], float]) -> None:
        if poll >= staleness:
            raise ValueError(f"the revocation poll ({poll} s) must be more frequent than the staleness bound "
                             f"({staleness} s)")
        self._feed, self._issuer = feed, issuer
        self._capacity, self._refresh_after = entries, refresh_after
        self._poll, self._staleness = poll, staleness
        self._now = monotonic
        self._entries: OrderedDict[str, dict[str, Cached]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[Cached]] = {}
        self._invalidated: dict[str, float] = {}  # serial -> when its answers were last dropped
        self._cleared_at = float("-inf")  # everything read before this is not kept
        self._synced_at: float | None = None  # when the last successful poll began
        self._watermark: int | None = None

    # --- serving -----------------------------------------------------------------------------------------------

    def trusted(self) -> bool:
        """Whether cached answers may be used: the last successful revocation poll began recently enough."""
        return self._synced_at is not None and self._now() - self._synced_at <= self._staleness

    def lookup(self, serial: str, algorithm: str) -> Signed | None:
        """The cached response, if it may be served now (trusted, not invalidated); starts a refresh of an old one."""
        if not self.trusted():
            return None
        by_algorithm = self._entries.get(serial)
        cached = None if by_algorithm is None else by_algorithm.get(algorithm)
        if cached is None:
            return None
        self._entries.move_to_end(serial)
        return cached.signed

    def needs_refresh(self, serial: str, algorithm: str) -> bool:
        """Whether the cached response is old enough to be produced again (it is still served meanwhile)."""
        by_algorithm = self._entries.get(serial)
        cached = None if by_algorithm is None else by_algorithm.get(algorithm)
        return cached is not None and self._now() - cached.read_at >= self._refresh_after

    async def get(self, serial: str, algorithm: str, produce: Produce) -> tuple[Signed, bool]:
        """(the response, whether it came from the cache). A miss produces it once however many ask at once."""
        signed = self.lookup(serial, algorithm)
        if signed is not None:
            if self.needs_refresh(serial, algorithm):
                self.refresh(serial, algorithm, produce)
            return signed, True
        task = self._start(serial, algorithm, produce)
        return (await asyncio.shield(task)).signed, False

    def refresh(self, serial: str, algorithm: str, produce: Produce) -> None:
        """Produce the response again in the background (the cached one is served meanwhile, well before its
        nextUpdate); a failure keeps the old one."""
        self._start(serial, algorithm, produce)

    def _start(self, serial: str, algorithm: str, produce: Produce) -> asyncio.Task[Cached]:
        key = (serial, algorithm)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._produce(serial, algorithm, produce))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return task

    def _finished(self, key: tuple[str, str], task: asyncio.Task[Cached]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), HapkiError):
            log.debug("OCSP production of %s failed: %r", key[0], task.exception())

    async def _produce(self, serial: str, algorithm: str, produce: Produce) -> Cached:
        read_at = self._now()  # before the status read begins
        cached = Cached(signed=await produce(), read_at=read_at)
        if self._keepable(serial, cached):
            self._entries.setdefault(serial, {})[algorithm] = cached
            self._entries.move_to_end(serial)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return cached

    def _keepable(self, serial: str, cached: Cached) -> bool:
        if self._capacity == 0:
            return False
        if cached.signed.status == "revoked":  # final: no later event can make it wrong
            return True
        read_at = cached.read_at
        return (read_at > self._cleared_at and read_at > self._invalidated.get(serial, float("-inf"))
                and self._now() - read_at < PRODUCTION_WINDOW_SECONDS)

    # --- revocations ---------------------------------------------------------------------------------------------

    def invalidate(self, serial: str) -> None:
        """Drop the serial's cached answers unless they already say revoked; reads begun before now are not kept."""
        serial = format(int(serial, 16), "x")  # the cache's key: lowercase hex without leading zeros
        self._invalidated[serial] = self._now()
        # A production in flight read (or may have read) the status before: its callers get it, later ones do not.
        for key in [key for key in self._inflight if key[0] == serial]:
            del self._inflight[key]
        by_algorithm = self._entries.get(serial)
        if by_algorithm is None:
            return
        for algorithm, cached in list(by_algorithm.items()):
            if cached.signed.status != "revoked":
                del by_algorithm[algorithm]
        if not by_algorithm:
            del self._entries[serial]

    def clear(self) -> None:
        """Drop every cached answer and every production in flight: what was read before now is not kept (the
        issuing CA itself was revoked)."""
        self._entries.clear()
        self._inflight.clear()
        self._cleared_at = self._now()

    async def sync(self) -> None:
        """One revocation poll: drop what was revoked since the last one; on success the cache is trusted anew."""
        began = self._now()
        serials, watermark = await self._feed.revocations_since(self._issuer, self._watermark)
        if self._watermark is None:  # nothing to compare with: whatever was kept before is dropped
            self._entries.clear()
            self._cleared_at = self._now()
        for serial in serials:
            self.invalidate(serial)
        self._watermark = watermark
        self._synced_at = began
        horizon = self._now() - PRODUCTION_WINDOW_SECONDS
        self._invalidated = {s: t for s, t in self._invalidated.items() if t > horizon}

    async def run(self) -> None:
        """Poll for revocations every `poll` seconds, forever (cancel to stop). Failures are logged, not raised."""
        failing = False
        while True:
            token = context.attach(telemetry.unsampled())  # no root span per poll (they would bury real traces)
            try:
                await asyncio.wait_for(self.sync(), self._staleness)
                if failing:
                    log.info("OCSP cache: revocation poll works again; cached answers are served")
                failing = False
            except (HapkiError, TimeoutError) as exc:
                if not failing:
                    log.warning("OCSP cache: revocation poll failed (%s); cached answers stop after %.1f s",
                                exc, self._staleness)
                failing = True
            except Exception:  # a bug: logged; the loop must go on (without polls, the cache is never trusted)
                log.exception("OCSP cache: revocation poll raised")
                failing = True
            finally:
                context.detach(token)
            await asyncio.sleep(self._poll)

    def __len__(self) -> int:
        return sum(len(by_algorithm) for by_algorithm in self._entries.values())

    async def close(self) -> None:
        """Cancel productions in flight (their callers get CancelledError)."""
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
