"""A service started before what it needs: it waits, saying so, instead of dying into its supervisor's crash loop.

After a whole site lost power every machine boots at once, in no order: a CARA member may start while the Galera
nodes still recover and the NATS servers still elect their stream leaders. Its first start then fails (a database
transaction that finds no node, a JetStream API call that times out). Restarting the process would work, but the
supervisor (hapki.runtime.supervise) counts a child that dies within seconds of its start as a crash loop and gives
up after five, and keepalived then takes the member out of its VIP's election for good. So a start that fails
because a dependency is not there *yet* is torn down and tried again in the same process, with growing pauses,
for up to `startup_wait_seconds` (config, default 600); anything else (a bad key, a schema that is not current,
a refused HSM key) still stops the start at once. Nothing is served meanwhile: /health does not answer, so the
member's track script keeps it out of the VIP election until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import nats.errors
import nats.js.errors

from hapki.contracts.errors import Unavailable

__all__ = ["NOT_YET", "Startable", "start_when_available"]

log = logging.getLogger("hapki.startup")

# What "not there yet" looks like: a database or HSM the runtime's adapters call unavailable, the bus unreachable
# or its JetStream API not answering (no stream leader yet), a refused or reset connection.
NOT_YET: tuple[type[BaseException], ...] = (
    Unavailable,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    ConnectionError,
)
FIRST_PAUSE_SECONDS = 0.5
LONGEST_PAUSE_SECONDS = 5.0

S = TypeVar("S", bound="Startable")


class Startable(Protocol):
    async def start(self) -> object: ...

    async def stop(self) -> None: ...


async def start_when_available(make: Callable[[], S], *, service: str, wait_seconds: float,
                               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                               clock: Callable[[], float] = time.monotonic) -> S:
    """Start a fresh runtime from `make()` until one starts; one whose start failed with a NOT_YET error is
    stopped (closing what it had opened) and replaced after a pause. The last error is raised once `wait_seconds`
    have passed; any other error at once."""
    deadline = clock() + wait_seconds
    pause = FIRST_PAUSE_SECONDS
    attempt = 0
    while True:
        attempt += 1
        runtime = make()
        try:
            await runtime.start()
        except NOT_YET as exc:
            await runtime.stop()
            if clock() + pause > deadline:
                log.error("%s: gave up waiting for what it needs after %d attempts (startup_wait_seconds %.0f): %s",
                          service, attempt, wait_seconds, _describe(exc))
                raise
            log.warning("%s: not started, something it needs is not available yet (attempt %d): %s; trying again "
                        "in %.1f s", service, attempt, _describe(exc), pause)
            await sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_SECONDS)
            continue
        except Exception:
            await runtime.stop()
            raise
        if attempt > 1:
            log.info("%s: started at attempt %d", service, attempt)
        return runtime


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
