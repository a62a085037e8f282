"""The event loop `hapki serve` runs on: uvloop (libuv, with its TLS transport in C) unless HAPKI_EVENT_LOOP says
`asyncio` (the standard library's loop, as the tests and the other commands use).

Why uvloop: the services spend much of their CPU in the event loop and in asyncio's TLS, which runs the TLS
records of the database and bus connections through memory BIOs in Python code (docs/PERFORMANCE.md). uvloop
runs both in C. The connections and their certificate checks are the same (the ssl module's SSLContext).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOP_ENV = "HAPKI_EVENT_LOOP"
LOOPS = ("uvloop", "asyncio")
GC_ENV = "HAPKI_GC"
SERVICE_GC_THRESHOLDS = (5000, 20, 20)


def loop_factory(env: dict[str, str] | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the loop HAPKI_EVENT_LOOP names (default uvloop); ValueError for another name."""
    name = (os.environ if env is None else env).get(LOOP_ENV, "").strip().lower() or LOOPS[0]
    if name not in LOOPS:
        raise ValueError(f"{LOOP_ENV}={name!r}: one of {', '.join(LOOPS)}")
    if name == "asyncio":
        return asyncio.new_event_loop
    import uvloop

    return uvloop.new_event_loop


def tune_gc(env: dict[str, str] | None = None) -> bool:
    """Set the services' garbage collector up, unless HAPKI_GC says `default`; True if it did.

    What was imported so far (modules, classes, models: most of a service's objects) is frozen out of every
    collection, and the young generation collects every SERVICE_GC_THRESHOLDS[0] allocations instead of 700. Each
    message allocates hundreds of short-lived objects, so the default thresholds ran a collection every few
    requests and promoted requests still in flight into the older generations, whose full collections took 50-60
    ms in CLM (docs/PERFORMANCE-HISTORY.md, Session 7).
    """
    value = (os.environ if env is None else env).get(GC_ENV, "").strip().lower()
    if value == "default":
        return False
    if value:
        raise ValueError(f"{GC_ENV}={value!r}: unset, or default")
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVICE_GC_THRESHOLDS)
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on the services' event loop (as asyncio.run does with its own)."""
    try:
        factory = loop_factory()
        tune_gc()
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
