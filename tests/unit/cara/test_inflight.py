"""The signer's in-flight messages and which of them are due an in_progress() (hapki.cara.signer.InFlight)."""

from __future__ import annotations

from typing import Any

from hapki.cara.config import SignerConfig
from hapki.cara.signer import InFlight
from hapki.runtime.bus import SIGNING_ACK_WAIT_SECONDS

TICK = 0.125  # exact in binary floating point, as the sums of ticks below must be


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _held(clock: Clock, *names: str) -> tuple[InFlight, dict[str, Any]]:
    inflight, msgs = InFlight(clock), {name: object() for name in names}
    for name, msg in msgs.items():
        inflight.add(name, msg)  # type: ignore[arg-type]
    return inflight, msgs


def test_a_message_settled_within_its_first_interval_gets_no_in_progress() -> None:
    clock = Clock()
    inflight, msgs = _held(clock, "r1")
    clock.now += TICK / 2
    assert inflight.due(TICK) == []
    inflight.discard("r1", msgs["r1"])
    clock.now += TICK
    assert inflight.due(TICK) == [] and len(inflight) == 0


def test_a_held_message_is_reported_at_least_every_two_intervals_on_any_tick_phase() -> None:
    for phase in (0.0, 0.001, TICK / 2, TICK - 0.001):
        clock = Clock()
        clock.now += phase  # admitted somewhere between two ticks
        inflight, msgs = _held(clock, "r1")
        last_told, tick = clock.now, 100.0 + TICK
        while tick < 101.0:
            clock.now = tick
            if inflight.due(TICK):
                assert clock.now - last_told <= 2 * TICK + 1e-9
                last_told = clock.now
            tick += TICK
        assert clock.now - last_told <= 2 * TICK + 1e-9


def test_the_default_interval_reports_well_inside_ack_wait() -> None:
    assert 2 * SignerConfig().heartbeat_seconds < SIGNING_ACK_WAIT_SECONDS


def test_only_the_messages_due_are_reported_and_they_start_over() -> None:
    clock = Clock()
    inflight, msgs = _held(clock, "old")
    clock.now += TICK
    inflight.add("new", msgs.setdefault("new", object()))  # type: ignore[arg-type]
    assert inflight.due(TICK) == [msgs["old"]]
    clock.now += TICK / 2
    assert inflight.due(TICK) == []
    clock.now += TICK / 2
    assert inflight.due(TICK) == [msgs["old"], msgs["new"]]


def test_discard_forgets_only_the_copy_it_names() -> None:
    clock = Clock()
    inflight, msgs = _held(clock, "r1")
    newer = object()
    inflight.add("r1", newer)  # type: ignore[arg-type]
    inflight.discard("r1", msgs["r1"])
    assert "r1" in inflight
    inflight.discard("r1", newer)  # type: ignore[arg-type]
    assert "r1" not in inflight
