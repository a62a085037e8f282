"""`hapki serve`'s event loop: uvloop by default, the standard loop when HAPKI_EVENT_LOOP=asyncio."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from hapki.runtime import eventloop


def test_uvloop_is_the_default_and_asyncio_can_be_chosen() -> None:
    assert eventloop.loop_factory({}) is uvloop.new_event_loop
    assert eventloop.loop_factory({"HAPKI_EVENT_LOOP": " UVLOOP "}) is uvloop.new_event_loop
    assert eventloop.loop_factory({"HAPKI_EVENT_LOOP": "asyncio"}) is asyncio.new_event_loop
    with pytest.raises(ValueError, match="HAPKI_EVENT_LOOP"):
        eventloop.loop_factory({"HAPKI_EVENT_LOOP": "trio"})


def test_run_runs_the_coroutine_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def loop_module() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.delenv("HAPKI_EVENT_LOOP", raising=False)
    assert eventloop.run(loop_module()).startswith("uvloop")
    monkeypatch.setenv("HAPKI_EVENT_LOOP", "asyncio")
    assert eventloop.run(loop_module()).startswith("asyncio")
    monkeypatch.setenv("HAPKI_EVENT_LOOP", "nope")
    coroutine = loop_module()
    with pytest.raises(ValueError):
        eventloop.run(coroutine)
    assert coroutine.cr_frame is None  # closed, not left to warn "never awaited"
