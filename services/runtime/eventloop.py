"""The event loop `hapki serve` runs on: uvloop (libuv, with its TLS transport in C) unless HAPKI_EVENT_LOOP says
`asyncio` (the standard library's loop, as the tests and the other commands use).

Why uvloop: the services spend much of their CPU in the event loop and in asyncio's TLS, which runs the TLS
records of the database and bus connections through memory BIOs in Python code (docs/PERFORMANCE.md). uvloop
runs both in C. The connections and their certificate checks are the same (the ssl module's SSLContext).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOP_ENV = "HAPKI_EVENT_LOOP"
LOOPS = ("uvloop", "asyncio")


def loop_factory(env: dict[str, str] | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the loop HAPKI_EVENT_LOOP names (default uvloop); ValueError for another name."""
    name = (os.environ if env is None else env).get(LOOP_ENV, "").strip().lower() or LOOPS[0]
    if name not in LOOPS:
        raise ValueError(f"{LOOP_ENV}={name!r}: one of {', '.join(LOOPS)}")
    if name == "asyncio":
        return asyncio.new_event_loop
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on the services' event loop (as asyncio.run does with its own)."""
    try:
        factory = loop_factory()
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
