"""Stopping a service's background tasks so that a stop cannot hang on a lost cancel."""

from __future__ import annotations

import asyncio
import contextlib

RECANCEL_SECONDS = 0.1


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel `task` until it has ended, then reap it (its own exception, other than the cancel, is raised).

    One cancel can be lost: on Python 3.11 `asyncio.wait_for` returns the awaited result instead of raising when
    its task is cancelled in the same turn as the awaited thing completes (and library code may catch one), and a
    loop that lost it runs on while `stop()` waits forever. So it is cancelled again every RECANCEL_SECONDS."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task
