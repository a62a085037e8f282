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


class AnnouncingVip(FakeVip):
    """A VIP whose moves are announced, as the kernel announces address changes (VipOwnership(announced=True))."""

    def __init__(self) -> None:
        super().__init__()
        self.announced = asyncio.Event()
        self.waits: list[float] = []

    async def changed(self, timeout: float) -> bool:
        self.waits.append(timeout)
        try:
            await asyncio.wait_for(self.announced.wait(), timeout)
        except TimeoutError:
            return False
        self.announced.clear()
        return True

    def move(self, held: bool) -> None:
        self.held = held
        self.announced.set()


async def until(condition: object, seconds: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_run_waits_for_the_kernels_announcement_instead_of_polling() -> None:
    vip, signer = AnnouncingVip(), FakeSigner()
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, recheck_seconds=30.0)
    task = asyncio.create_task(role.run())
    try:
        await asyncio.sleep(0.2)  # twenty polls' worth
        assert vip.waits == [30.0] and not signer.active  # one wait on the kernel, not a poll loop
        vip.move(True)
        await until(lambda: signer.active)
        vip.move(False)
        await until(lambda: not signer.active)
        vip.move(True)
        await until(lambda: signer.active and signer.epoch == 2)
        assert set(vip.waits) == {30.0}
    finally:
        await _stopped(task)


async def test_a_fenced_signer_wakes_the_waiting_role() -> None:
    vip, signer = AnnouncingVip(), FakeSigner()
    vip.held = True
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, recheck_seconds=30.0, fenced_backoff_seconds=0.05)
    task = asyncio.create_task(role.run())
    try:
        await until(lambda: signer.active)
        signer.get_fenced()  # no address changes: only the fence can wake it before 30 s
        await until(lambda: signer.active and signer.epoch == 2)
        assert [what for _, what in role.transitions] == ["active at epoch 1", "fenced: stepped down",
                                                          "active at epoch 2"]
    finally:
        await _stopped(task)


async def test_a_start_that_failed_is_retried_at_the_poll_interval() -> None:
    vip, signer = AnnouncingVip(), FakeSigner()
    vip.held, signer.fail_next_start = True, True
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, recheck_seconds=30.0)
    task = asyncio.create_task(role.run())
    try:
        await until(lambda: signer.active, seconds=0.5)  # not after the 30 s recheck
    finally:
        await _stopped(task)


async def test_a_fence_between_the_step_and_the_wait_is_not_missed() -> None:
    class FencedRightAfterTheStep(FakeSigner):
        fence_on_read = False

        @property
        def active(self) -> bool:
            seen = self._active
            if self.fence_on_read and seen:  # the step sees it active; by the time the role waits, it is fenced
                self.fence_on_read = False
                self.get_fenced()
            return seen

    vip, signer = AnnouncingVip(), FencedRightAfterTheStep()
    vip.held = True
    role = RoleSupervisor(vip, signer, poll_seconds=0.01, recheck_seconds=30.0, fenced_backoff_seconds=0.05)
    task = asyncio.create_task(role.run())
    try:
        await until(lambda: signer.epoch == 1)
        await asyncio.sleep(0.05)  # the role waits now (settled)
        signer.fence_on_read = True
        vip.announced.set()  # a spurious announcement: one step, which sees it active and leaves it fenced
        await until(lambda: signer.epoch == 2)  # started again, not after the 30 s recheck (epoch: no property read)
    finally:
        await _stopped(task)
