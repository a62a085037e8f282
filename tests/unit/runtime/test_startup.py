"""hapki.runtime.startup: a start that fails because a dependency is not there yet is torn down and tried again;
any other failure stops the start at once; the wait is bounded."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from hapki.contracts.errors import ConfigInvalid, DatabaseError
from hapki.runtime.startup import LONGEST_PAUSE_SECONDS, start_when_available


class FakeRuntime:
    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome, self.started, self.stopped = outcome, False, False

    async def start(self) -> None:
        if self.outcome is not None:
            raise self.outcome
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


class Clock:
    def __init__(self) -> None:
        self.now, self.pauses = 0.0, []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def attempts(*outcomes: BaseException | None) -> tuple[list[FakeRuntime], object]:
    made: list[FakeRuntime] = []
    queue = list(outcomes)

    def make() -> FakeRuntime:
        made.append(FakeRuntime(queue.pop(0)))
        return made[-1]

    return made, make


def test_a_dependency_that_comes_back_is_waited_for_and_each_failed_start_is_torn_down() -> None:
    clock = Clock()
    made, make = attempts(DatabaseError("no node answers"), nats.errors.NoServersError(),
                          nats.errors.TimeoutError(), None)
    runtime = asyncio.run(start_when_available(make, service="cara", wait_seconds=60, sleep=clock.sleep, clock=clock))
    assert runtime is made[-1] and runtime.started and not runtime.stopped
    assert [r.stopped for r in made[:-1]] == [True, True, True], "what a failed start opened is closed"
    assert clock.pauses == [0.5, 1.0, 2.0]


def test_any_other_error_stops_the_start_at_once() -> None:
    clock = Clock()
    made, make = attempts(ConfigInvalid("the schema is not current"), None)
    with pytest.raises(ConfigInvalid):
        asyncio.run(start_when_available(make, service="clm", wait_seconds=60, sleep=clock.sleep, clock=clock))
    assert len(made) == 1 and made[0].stopped and clock.pauses == []


def test_the_wait_is_bounded_and_the_last_error_is_raised() -> None:
    clock = Clock()
    made, make = attempts(*[DatabaseError(f"attempt {i}") for i in range(100)])
    with pytest.raises(DatabaseError, match="attempt"):
        asyncio.run(start_when_available(make, service="cara", wait_seconds=30, sleep=clock.sleep, clock=clock))
    assert clock.now <= 30 and max(clock.pauses) == LONGEST_PAUSE_SECONDS
    assert all(r.stopped for r in made) and 6 < len(made) < 15
