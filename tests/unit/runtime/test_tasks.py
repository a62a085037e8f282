"""cancel_and_wait: a task that loses a cancel is cancelled again until it ends."""

from __future__ import annotations

import asyncio

import pytest
from hapki.runtime.tasks import cancel_and_wait


def test_a_task_that_swallows_the_first_cancel_still_ends() -> None:
    async def main() -> int:
        lost = 0

        async def loop() -> None:
            nonlocal lost
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if lost == 0:  # as a wait_for on Python 3.11 may do: the cancel is gone, the loop goes on
                        lost += 1
                        continue
                    raise

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.01)
        await asyncio.wait_for(cancel_and_wait(task), 5)
        assert task.cancelled()
        return lost

    assert asyncio.run(main()) == 1


def test_the_tasks_own_failure_is_raised() -> None:
    async def main() -> None:
        async def failing() -> None:
            raise ValueError("broken")

        task = asyncio.create_task(failing())
        await asyncio.sleep(0)
        await cancel_and_wait(task)

    with pytest.raises(ValueError, match="broken"):
        asyncio.run(main())
