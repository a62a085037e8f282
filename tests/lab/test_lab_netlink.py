"""VIP ownership announced by the kernel: a process waiting in `VipOwnership.changed()` wakes when an address comes
or goes in its network namespace, reads the truth with a dump, and is not woken while nothing changes.

Against the real kernel, in a network namespace of the test's own (no lab needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from hapki.runtime.netlink import AddressChanges

VIP = "10.213.250.7"
WAITER = textwrap.dedent(f"""
    import asyncio, sys, time
    from hapki.runtime.netlink import VipOwnership

    async def main() -> None:
        own = VipOwnership({VIP!r}, announced=True)
        print("start", own.holds(), flush=True)
        for _ in range(2):
            started = time.monotonic()
            woke = await own.changed(20.0)
            print("woke", woke, own.holds(), round(time.monotonic() - started, 3), flush=True)
        print("quiet", await own.changed(0.3), flush=True)
        own.close()

    asyncio.run(main())
""")


@pytest.fixture
def netns(namespaces_work: None) -> Iterator[str]:
    name = f"hapki-t-netlink-{os.getpid()}"
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)  # a leftover of an earlier run
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def test_a_waiter_wakes_when_the_vip_comes_and_goes(netns: str) -> None:
    waiter = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", WAITER],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout is not None
        assert waiter.stdout.readline().split() == ["start", "False"]
        subprocess.run(["ip", "-n", netns, "addr", "add", f"{VIP}/32", "dev", "lo"], check=True)
        woke, changed, holds, seconds = waiter.stdout.readline().split()
        assert (woke, changed, holds) == ("woke", "True", "True")
        assert float(seconds) < 5.0  # the announcement, not the 20 s timeout
        subprocess.run(["ip", "-n", netns, "addr", "del", f"{VIP}/32", "dev", "lo"], check=True)
        assert waiter.stdout.readline().split()[:3] == ["woke", "True", "False"]
        assert waiter.stdout.readline().split() == ["quiet", "False"]  # nothing changed: the timeout
        assert waiter.wait(timeout=10) == 0, waiter.stderr.read() if waiter.stderr else ""
    finally:
        waiter.kill()
        waiter.wait()


async def test_dropped_announcements_count_as_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    # ENOBUFS: the kernel dropped announcements because the socket's buffer was full; one may have been the VIP's.
    changes = AddressChanges()

    class Overflowed:
        def __init__(self, real: object) -> None:
            self.real = real

        def recv(self, size: int) -> bytes:
            raise OSError(105, "No buffer space available")

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    try:
        assert await changes.wait(0.05) is False
        monkeypatch.setattr(changes, "_sock", Overflowed(changes._sock))  # noqa: SLF001
        changes._drain()  # noqa: SLF001 - what the event loop calls when the socket is readable
        assert await changes.wait(0.05) is True
    finally:
        monkeypatch.undo()
        changes.close()
