"""`hapki serve`'s event loop: uvloop by default, the standard loop when HAPKI_EVENT_LOOP=asyncio; the services'
garbage collector settings unless HAPKI_GC=default."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import uvloop

from hapki.runtime import eventloop


def test_uvloop_is_the_default_and_asyncio_can_be_chosen() -> None:
    assert eventloop.loop_factory({}) is uvloop.new_event_loop
    assert eventloop.loop_factory({"HAPKI_EVENT_LOOP": " UVLOOP "}) is uvloop.new_event_loop
    assert eventloop.loop_factory({"HAPKI_EVENT_LOOP": "asyncio"}) is asyncio.new_event_loop
    with pytest.raises(ValueError, match="HAPKI_EVENT_LOOP"):
        eventloop.loop_factory({"HAPKI_EVENT_LOOP": "trio"})


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The collector's settings of this test process, as they were before the test."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def test_run_runs_the_coroutine_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch, gc_restored: None) -> None:
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


def test_the_services_collect_young_objects_less_often_and_never_scan_what_was_there_at_start(
        gc_restored: None) -> None:
    gc.set_threshold(700, 10, 10)
    assert eventloop.tune_gc({}) is True
    assert gc.get_threshold() == eventloop.SERVICE_GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000  # the modules imported so far
    with pytest.raises(ValueError, match="HAPKI_GC"):
        eventloop.tune_gc({"HAPKI_GC": "aggressive"})


def test_hapki_gc_default_keeps_pythons_settings(gc_restored: None) -> None:
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    assert eventloop.tune_gc({"HAPKI_GC": " Default "}) is False
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0


def test_run_sets_the_collector_up(monkeypatch: pytest.MonkeyPatch, gc_restored: None) -> None:
    async def threshold() -> tuple[int, int, int]:
        return gc.get_threshold()

    monkeypatch.delenv("HAPKI_GC", raising=False)
    gc.set_threshold(700, 10, 10)
    assert eventloop.run(threshold()) == eventloop.SERVICE_GC_THRESHOLDS
