"""Active only with the VIP: turns the kernel's view of the CARA floating IP into signer start/stop.

Gaining the VIP: start the signer (it bumps the epoch by compare-and-set, resolves stale intents, pulls).
Losing it: stop the signer (no more fetches; what is unprocessed goes back to the stream for the new active).
Fenced while still holding the VIP (split brain: the other member bumped the epoch): step down, then try again
after a back-off, so two members that both hold the VIP take turns instead of fencing each other in a tight loop;
whoever holds the current epoch is the only one that can commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from hapki.contracts.errors import FencedOut, HapkiError
from hapki.runtime import metrics

log = logging.getLogger("hapki.cara.role")
_TRANSITIONS = metrics.counter("hapki.cara.role.transitions")


class Ownership(Protocol):
    def holds(self) -> bool: ...

    async def changed(self, timeout: float) -> bool: ...


class Activatable(Protocol):
    fenced: asyncio.Event

    @property
    def active(self) -> bool: ...

    async def start(self) -> int: ...

    async def stop(self) -> None: ...


class Activity(Protocol):
    """Whether this member is the active one and under which epoch (the Signer)."""

    @property
    def active(self) -> bool: ...

    @property
    def epoch(self) -> int | None: ...


async def first_of(*waits: Awaitable[object], timeout: float | None = None) -> None:
    """Until the first of ``waits`` completes, or ``timeout`` s; the others are cancelled (and reaped)."""
    waiters = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def run_while_active(activity: Activity, tick: Callable[[int], Awaitable[object]], *,
                           wait: Callable[[], Awaitable[None]], what: str, logger: logging.Logger) -> None:
    """The loop of a task only the active member does (CRLs, audit sealing): after each `wait`, `tick(epoch)` if
    active. A failure is logged and retried next round; fenced out, the signer steps down on its own."""
    while True:
        await wait()
        epoch = activity.epoch
        if not activity.active or epoch is None:
            continue
        try:
            await tick(epoch)
        except FencedOut as exc:
            logger.info("%s: fenced out (the signer steps down on its own): %s", what, exc)
        except HapkiError as exc:
            logger.warning("%s failed: %s; retrying at the next round", what, exc)
        except Exception:
            logger.exception("bug in %s; retrying at the next round", what)


class RoleSupervisor:
    """Keeps the signer's state in line with VIP ownership.

    While they agree (active exactly with the VIP) it waits for the kernel to announce an address change, for the
    signer to be fenced, or at most `recheck_seconds`; while they do not (a start to retry, a fenced back-off to
    sit out) it looks again every `poll_seconds`.
    """

    def __init__(
        self,
        ownership: Ownership,
        signer: Activatable,
        *,
        poll_seconds: float,
        recheck_seconds: float = 1.0,
        fenced_backoff_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        member: str = "-",
    ) -> None:
        self._ownership, self._signer, self._member = ownership, signer, member
        self._poll, self._recheck, self._backoff, self._clock = (poll_seconds, recheck_seconds,
                                                                 fenced_backoff_seconds, clock)
        self._retry_at = 0.0
        self._held = False  # what the last step saw
        self.transitions: list[tuple[float, str]] = []  # (monotonic time, what happened), for health and tests

    async def step(self) -> bool:
        """One observation and at most one transition; True if the signer now runs exactly while the VIP is
        held (nothing to retry)."""
        holds = self._held = self._ownership.holds()
        active = self._signer.active
        if holds and not active:
            if self._signer.fenced.is_set() and self._retry_at == 0.0:
                self._retry_at = self._clock() + self._backoff
                self._note("fenced: stepped down", "fenced")
            if self._clock() < self._retry_at:
                return False
            try:
                epoch = await self._signer.start()
            except HapkiError as exc:  # database or bus not ready: try again at the next poll
                log.warning("could not become active: %s", exc)
                return False
            self._retry_at = 0.0
            self._note(f"active at epoch {epoch}", "active")
        elif not holds and active:
            await self._signer.stop()
            self._retry_at = 0.0
            self._note("passive: VIP lost", "passive")
        return True

    async def run(self) -> None:
        while True:
            if await self.step():
                await self._until_something_changes()
            else:
                await asyncio.sleep(self._poll)

    async def _until_something_changes(self) -> None:
        """An address change announced by the kernel, the signer fenced out, or `recheck_seconds`.

        The fence is waited for whenever the last step saw the VIP held (so left the signer active): also when it
        came between that step and now, `fenced` is set and the wait ends at once."""
        if not self._held:
            await self._ownership.changed(self._recheck)
            return
        await first_of(self._ownership.changed(self._recheck), self._signer.fenced.wait())

    def _note(self, what: str, transition: str) -> None:
        log.info("role: %s", what)
        _TRANSITIONS.add(1, {"pki.member": self._member, "pki.transition": transition})
        self.transitions.append((self._clock(), what))
