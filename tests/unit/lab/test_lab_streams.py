"""`hapki lab up`'s streams step: a leaderless stream (API timeouts) gets the NATS servers restarted one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats.errors
import pytest

from hapki.lab import ha
from hapki.lab.ha import Lab, LabError
from hapki.runtime import bus


class _Connection:
    def jetstream(self, timeout: float) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Lab, list[str]]:
    events: list[str] = []
    lab = Lab(tmp_path)

    async def connect(*args: Any, **kwargs: Any) -> _Connection:
        return _Connection()

    monkeypatch.setattr(bus, "connect", connect)
    monkeypatch.setattr(lab, "_restart_nats_rolling", lambda: events.append("rolling restart"))
    monkeypatch.setattr(lab, "_nats_config", lambda *a: None)
    return lab, events


def _topology_failing(times: int, events: list[str]):
    async def ensure_topology(js: Any, config: Any) -> None:
        events.append("ensure")
        if events.count("ensure") <= times:
            raise nats.errors.TimeoutError()
    return ensure_topology


def test_a_stream_that_times_out_gets_a_rolling_restart_then_succeeds(lab, monkeypatch) -> None:
    lab, events = lab
    monkeypatch.setattr(bus, "ensure_topology", _topology_failing(1, events))
    lab._ensure_streams()
    assert events == ["ensure", "rolling restart", "ensure"]


def test_it_gives_up_with_a_lab_error_after_its_attempts(lab, monkeypatch) -> None:
    lab, events = lab
    monkeypatch.setattr(bus, "ensure_topology", _topology_failing(99, events))
    with pytest.raises(LabError, match="rolling restarts"):
        lab._ensure_streams()
    assert events.count("ensure") == ha.STREAMS_ATTEMPTS
    assert events.count("rolling restart") == ha.STREAMS_ATTEMPTS - 1
