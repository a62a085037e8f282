"""Every signing batch of a process runs in its one signing thread (hapki.cara.batch.in_signing_thread): off the
event loop, one at a time, in the caller's context (so `hsm.sign` spans nest under the batch's)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from hapki.cara.batch import in_signing_thread

_CALLER = contextvars.ContextVar("caller", default="none")


def _work(label: str, hold: float, running: list[str], overlaps: list[str]) -> tuple[str, str, str]:
    if running:
        overlaps.append(label)
    running.append(label)
    time.sleep(hold)
    running.remove(label)
    return threading.current_thread().name, _CALLER.get(), label


async def _batch(label: str, hold: float, running: list[str], overlaps: list[str]) -> tuple[str, str, str]:
    _CALLER.set(label)
    return await in_signing_thread(_work, label, hold, running, overlaps)


async def test_batches_share_one_thread_off_the_loop_and_keep_their_context() -> None:
    running: list[str] = []
    overlaps: list[str] = []
    results = await asyncio.gather(*(_batch(f"batch-{i}", 0.02, running, overlaps) for i in range(4)))
    threads = {name for name, _, _ in results}
    assert len(threads) == 1, threads
    (thread,) = threads
    assert thread.startswith("hapki-sign") and thread != threading.current_thread().name
    assert overlaps == [], "two batches were signed at once"
    assert [(caller, label) for _, caller, label in results] == [(f"batch-{i}", f"batch-{i}") for i in range(4)]


async def test_an_error_in_the_signing_thread_reaches_the_caller_and_the_thread_goes_on() -> None:
    def fail() -> None:
        raise ValueError("HSM said no")

    with pytest.raises(ValueError, match="HSM said no"):
        await in_signing_thread(fail)
    assert (await in_signing_thread(lambda: threading.current_thread().name)).startswith("hapki-sign")
