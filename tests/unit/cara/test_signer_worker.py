"""A signer worker follows its parent's epoch and the VIP, never rejoins an epoch it was fenced out of, and reports
to its parent; `[signer] processes` and HAPKI_SIGNER_PROCESSES parse strictly."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hapki.cara.config import SIGNER_PROCESSES_ENV, CaraConfig, with_env
from hapki.cara.signer_worker import SignerWorker
from hapki.contracts.errors import ConfigInvalid
from hapki.runtime.config import load_toml

EXAMPLE = Path(__file__).parents[3] / "compose" / "config" / "cara.toml"


class FakeVip:
    """VIP ownership whose moves are announced (as the kernel's netlink announcements are): `move()` wakes
    `changed()`; `reads` counts `holds()`."""

    def __init__(self) -> None:
        self.held = True
        self.reads = 0
        self._moved = asyncio.Event()

    def holds(self) -> bool:
        self.reads += 1
        return self.held

    def move(self, held: bool) -> None:
        self.held = held
        self._moved.set()

    async def changed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._moved.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self._moved.clear()
        return True


class FakeSigner:
    """The Signer surface a worker drives: join(epoch) without bumping, stop(), fenced, active, epoch."""

    def __init__(self) -> None:
        self.fenced = asyncio.Event()
        self.active = False
        self.epoch: int | None = None
        self.signatures = 0
        self.joined: list[int] = []
        self.started = 0

    async def start(self) -> int:  # a worker must never bump the epoch
        self.started += 1
        raise AssertionError("a signer worker bumped the epoch")

    async def join(self, epoch: int) -> None:
        self.fenced.clear()
        self.active, self.epoch = True, epoch
        self.joined.append(epoch)

    async def stop(self) -> None:
        self.active = False

    def get_fenced(self) -> None:
        self.fenced.set()
        self.active = False


def _worker(vip: FakeVip | None = None, recheck: float = 1.0) -> tuple[SignerWorker, FakeSigner, io.StringIO]:
    signer, out = FakeSigner(), io.StringIO()
    worker = SignerWorker(signer, vip, poll_seconds=0.01, recheck_seconds=recheck, out=out)  # type: ignore[arg-type]
    return worker, signer, out


@contextlib.asynccontextmanager
async def _signing(recheck: float) -> AsyncIterator[tuple[FakeVip, FakeSigner, io.StringIO]]:
    """A running worker that holds the VIP, was asked to sign under epoch 4 and signs; closed on exit."""
    vip = FakeVip()
    worker, signer, out = _worker(vip, recheck=recheck)
    worker.ask(4, 1)
    task = asyncio.create_task(worker.run())
    try:
        assert await _until(lambda: signer.active)
        yield vip, signer, out
    finally:
        worker.close()
        await asyncio.wait_for(task, 5)


async def _until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


def _reports(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_signs_only_under_the_epoch_its_parent_sent() -> None:
    worker, signer, out = _worker()
    await worker.step()
    assert not signer.active and signer.joined == []
    worker.ask(7, 1)
    await worker.step()
    assert signer.active and signer.joined == [7] and signer.started == 0
    worker.ask(8, 2)  # the parent bumped again (passive, then active): the worker moves to the new epoch
    await worker.step()
    assert signer.joined == [7, 8] and signer.epoch == 8
    worker.ask(8, 3)  # the same word again: acknowledged, nothing else changes
    await worker.step()
    worker.ask(None, 4)
    await worker.step()
    assert not signer.active
    assert [(r["state"], r["epoch"], r["word"]) for r in _reports(out)] == [
        ("passive", None, 0), ("active", 7, 1), ("active", 8, 2), ("active", 8, 3), ("passive", 8, 4)]


async def test_stops_without_the_vip_and_resumes_with_it_under_the_same_epoch() -> None:
    vip = FakeVip()
    worker, signer, _ = _worker(vip)
    worker.ask(3)
    await worker.step()
    assert signer.active
    vip.held = False
    await worker.step()
    assert not signer.active
    await worker.step()
    assert not signer.active and signer.joined == [3]
    vip.held = True
    await worker.step()
    assert signer.active and signer.joined == [3, 3]


async def test_fenced_it_stays_passive_until_a_newer_epoch_arrives() -> None:
    worker, signer, out = _worker()
    worker.ask(5)
    await worker.step()
    signer.get_fenced()
    await worker.step()
    worker.ask(5)  # the parent's word still names the epoch we were fenced out of
    await worker.step()
    assert not signer.active and signer.joined == [5]
    assert _reports(out)[-1] == {"state": "fenced", "epoch": 5, "word": 0, "signatures": 0}
    worker.ask(6)
    await worker.step()
    assert signer.active and signer.joined == [5, 6]


async def test_run_ends_passive_when_closed() -> None:
    worker, signer, out = _worker()
    worker.ask(2)
    running = asyncio.create_task(worker.run())
    for _ in range(100):
        if signer.active:
            break
        await asyncio.sleep(0.01)
    assert signer.active
    worker.close()
    await asyncio.wait_for(running, 5)
    assert not signer.active and _reports(out)[-1]["state"] == "passive"


async def test_while_signing_as_asked_it_waits_instead_of_polling_the_vip() -> None:
    # Poll interval 10 ms, recheck 10 s: a worker that polled would read the VIP about 30 times in 0.3 s.
    async with _signing(recheck=10.0) as (vip, _signer, _out):
        reads = vip.reads
        await asyncio.sleep(0.3)
        assert vip.reads - reads <= 1, f"{vip.reads - reads} VIP reads in 0.3 s while nothing changed"


async def test_an_announced_vip_loss_and_a_fence_wake_it_at_once() -> None:
    async with _signing(recheck=10.0) as (vip, signer, out):
        vip.move(False)
        assert await _until(lambda: not signer.active, 1.0), "the announced VIP loss did not stop the signer"
        vip.move(True)
        assert await _until(lambda: signer.active, 1.0) and signer.joined == [4, 4]
        signer.get_fenced()  # the main process moved the epoch on: the worker says so to its parent at once
        assert await _until(lambda: _reports(out)[-1]["state"] == "fenced", 1.0), _reports(out)[-1]


def test_processes_default_to_one_and_parse_from_toml(tmp_path: Path) -> None:
    base = load_toml(EXAMPLE, CaraConfig)
    assert base.signer.processes == 1
    text = EXAMPLE.read_text().replace("[signer]\n", "[signer]\nprocesses = 3\n")
    (tmp_path / "cara.toml").write_text(text)
    assert load_toml(tmp_path / "cara.toml", CaraConfig).signer.processes == 3
    for bad in ("0", "17", '"two"'):
        (tmp_path / "bad.toml").write_text(EXAMPLE.read_text().replace("[signer]\n", f"[signer]\nprocesses = {bad}\n"))
        with pytest.raises(ConfigInvalid, match="signer.processes"):
            load_toml(tmp_path / "bad.toml", CaraConfig)


def test_the_environment_overrides_processes_strictly() -> None:
    base = load_toml(EXAMPLE, CaraConfig)
    assert with_env(base, {}) is base
    assert with_env(base, {SIGNER_PROCESSES_ENV: " "}) is base
    changed = with_env(base, {SIGNER_PROCESSES_ENV: "4"})
    assert changed.signer.processes == 4
    assert changed.model_copy(update={"signer": base.signer}) == base  # nothing else changed
    for bad in ("0", "17", "two", "-1", "2.5"):
        with pytest.raises(ValueError, match=SIGNER_PROCESSES_ENV if bad in ("two", "-1", "2.5") else "processes"):
            with_env(base, {SIGNER_PROCESSES_ENV: bad})
