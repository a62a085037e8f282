"""AddressChanges.wait stops when its task is cancelled, even as an announcement arrives at the same moment.

On Python 3.11, asyncio.wait_for returned the awaited result instead of raising CancelledError when both happened in
one turn of the loop; the watcher's loop and the CARA role supervisor then never stopped on SIGTERM (a graceful
member stop removes the VIP, an announcement, just as the services are told to stop). A CI run hung that way.
"""

from __future__ import annotations

import asyncio

import pytest
from hapki.runtime.netlink import AddressChanges


def test_a_cancel_as_an_announcement_arrives_still_ends_the_wait() -> None:
    async def main() -> None:
        changes = AddressChanges()
        try:
            waiter = asyncio.create_task(changes.wait(30.0))
            await asyncio.sleep(0.05)  # waiting for an announcement
            changes._changed.set()  # one arrives (as _drain sets it) ...
            waiter.cancel()  # ... in the same turn of the loop as the stop
            with pytest.raises(asyncio.CancelledError):
                await waiter
        finally:
            changes.close()

    asyncio.run(main())


def test_an_announcement_still_ends_the_wait_with_true() -> None:
    async def main() -> None:
        changes = AddressChanges()
        try:
            waiter = asyncio.create_task(changes.wait(30.0))
            await asyncio.sleep(0.05)
            changes._changed.set()
            assert await waiter is True
            assert await changes.wait(0.01) is False  # consumed; nothing new within 10 ms
        finally:
            changes.close()

    asyncio.run(main())
