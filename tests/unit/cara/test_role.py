"""The signer follows VIP ownership; a fenced member steps down and retries only after a back-off."""

from __future__ import annotations

import asyncio

from hapki.cara.role import RoleSupervisor
from hapki.contracts.errors import DatabaseError


class FakeVip:
    def __init__(self) -> None:
        self.held = False

    def holds(self) -> bool:
        return self.held


class FakeSigner:
    def __init__(self) -> None:
        self.fenced = asyncio.Event()
        self._active = False
        self.epoch = 0
        self.fail_next_start = False

    @property
    def active(self) -> bool:
        return self._active

    async def start(self) -> int:
        if self.fail_next_start:
            self.fail_next_start = False
            raise DatabaseError("no node ready")
        self.fenced.clear()
        self._active = True
        self.epoch += 1
        return self.epoch

    async def stop(self) -> None:
        self._active = False

    def get_fenced(self) -> None:
        self.fenced.set()
        self._active = False


async def test_active_exactly_while_holding_the_vip() -> None:
    vip, signer, now = FakeVip(), FakeSigner(), [0.0]
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, clock=lambda: now[0])
    await role.step()
    assert not signer.active
    vip.held = True
    await role.step()
    assert signer.active and signer.epoch == 1
    vip.held = False
    await role.step()
    assert not signer.active
    vip.held = True
    await role.step()
    assert signer.active and signer.epoch == 2  # every activation bumps the epoch


async def test_fenced_member_backs_off_before_bumping_again() -> None:
    vip, signer, now = FakeVip(), FakeSigner(), [0.0]
    vip.held = True
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, fenced_backoff_seconds=1.0, clock=lambda: now[0])
    await role.step()
    signer.get_fenced()
    await role.step()
    assert not signer.active  # no immediate re-bump
    now[0] = 0.5
    await role.step()
    assert not signer.active
    now[0] = 1.01
    await role.step()
    assert signer.active and signer.epoch == 2
    assert [what for _, what in role.transitions] == ["active at epoch 1", "fenced: stepped down", "active at epoch 2"]


async def test_an_unready_database_is_retried_at_the_next_poll() -> None:
    vip, signer = FakeVip(), FakeSigner()
    vip.held, signer.fail_next_start = True, True
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, clock=lambda: 0.0)
    await role.step()
    assert not signer.active
    await role.step()
    assert signer.active
