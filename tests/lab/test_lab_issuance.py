"""Issuance through the HA lab and through every CA-side failure the lab can stage: no request lost, none issued
twice, every signature accounted for (checked in the database), signing resumes within 1.5 s of a crash."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hapki.cli.client import new_key_and_csr
from hapki.lab.ha import Lab
from hapki.runtime.invariants import new_rows
from hapki.lab.load import Load, crash_member, database_facts, read_violations

pytestmark = pytest.mark.lab

CSRS = [new_key_and_csr([f"lab-{i}.example.com", "192.0.2.44"])[0].decode() for i in range(16)]


async def _checked_run(lab: Lab, fault, *, seconds: float = 6.0, fault_at: float = 2.0, rate: float = 20.0):
    """Load for `seconds`, `fault()` at `fault_at` (returns the fault's wall time); then the database's verdict."""
    before = await read_violations(lab)
    async with Load(lab, CSRS, rate) as load:
        driver = asyncio.create_task(load.run(seconds, give_up_after=30.0))
        await asyncio.sleep(fault_at)
        fault_time = await asyncio.to_thread(fault)
        await driver
    facts = await database_facts(lab, [r.key for r in load.requests], "", fault_time)
    broken = {name: rows for name, rows in new_rows(before, await read_violations(lab)).items() if rows}
    per_key = facts["requests"]
    assert len(load.requests) == int(seconds * rate)
    assert all(r.serial for r in load.requests), [(r.key, r.errors) for r in load.requests if not r.serial][:5]
    assert all(per_key[r.key][1] == "issued" and per_key[r.key][2] == 1 for r in load.requests)
    assert len({r.serial for r in load.requests}) == len(load.requests)  # one certificate per request, no reuse
    assert broken == {}
    return load, facts, fault_time


def test_issue_over_nats_and_over_https_on_the_clm_vip(lab: Lab, tmp_path: Path) -> None:
    async def run() -> Load:
        async with Load(lab, CSRS, rate=10.0) as load:
            await load.run(1.0, give_up_after=15.0)
        return load

    load = asyncio.run(run())
    assert {r.via for r in load.requests} == {"nats", "https"}
    # Every request issued; a first request right after `up` may outlive the client's 1 s first attempt (cold
    # caches) and be retried with its key, which is what the client is for.
    assert all(r.serial for r in load.requests), [r.errors for r in load.requests]
    assert all(e.startswith("TimeoutError") for r in load.requests for e in r.errors), [r.errors for r in load.requests]


@pytest.mark.parametrize("how", ["crash", "graceful"])
def test_active_cara_member_lost_under_load(lab: Lab, how: str, timing) -> None:
    active = lab.vip_holders("cara")[0]
    other = next(m for m in lab.topo.members_of_tier("cara") if m != active)

    def fault() -> float:
        if how == "crash":
            return crash_member(lab, active)
        began = time.time()
        lab.procs.stop_many(lab.procs.names(member=active), timeout=15.0)
        return began

    _load, facts, fault_time = asyncio.run(_checked_run(lab, fault))
    first = facts["first_signature"].get(other)
    assert first is not None, "the other member never signed"
    timing(f"cara.{how}.first_signature_after_fault", first - fault_time)
    assert first - fault_time < 1.5


def test_cara_split_brain_the_fence_lets_one_member_commit(lab: Lab, timing) -> None:
    members = lab.topo.members_of_tier("cara")

    def fault() -> float:
        began = time.time()
        lab.net.block_vrrp("cara")
        deadline = time.monotonic() + 5
        while sorted(lab.vip_holders("cara")) != sorted(members) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(lab.vip_holders("cara")) == sorted(members), "split brain did not form"
        return began

    async def run() -> None:
        await _checked_run(lab, fault, seconds=8.0, fault_at=1.0)
        # Both members hold the VIP and both try to sign: the epoch decides who commits (checked above through
        # stale_epoch_commits). Now heal: exactly one holder, and exactly one active signer.
        lab.net.unblock_vrrp("cara")
        took = await asyncio.to_thread(lab.wait_vip, "cara", None, 5.0)
        assert took is not None, lab.vip_holders("cara")
        timing("cara.split_brain.heal", took)
        # A member fenced during the split waits out its back-off (1 s) before it bumps again: poll, don't sleep.
        deadline, active = time.monotonic() + 5.0, []
        while time.monotonic() < deadline:
            active = [m for m in members if (await asyncio.to_thread(lab.member_health, m))["body"].get("active")]
            if active == lab.vip_holders("cara"):
                break
            await asyncio.sleep(0.1)
        assert active == lab.vip_holders("cara")

    asyncio.run(run())


def test_losing_hsm_a_is_invisible_to_clients(lab: Lab) -> None:
    tokens = lab.hsms["hsm-a"].token_dir
    dead = tokens.with_name("tokens.dead")

    def fault() -> float:
        tokens.rename(dead)  # SoftHSM re-reads its files on every call: the token is gone
        return time.time()

    try:
        load, _facts, _t = asyncio.run(_checked_run(lab, fault))
    finally:
        if dead.exists():
            dead.rename(tokens)
    # No error reply at all; a slow attempt retried by its client (TimeoutError on the 1 s first try) is delay,
    # which the fault suite measures, not an error.
    seen = [(r.via, round(r.sent_at - _t, 2), r.errors) for r in load.requests
            if any(not e.startswith("TimeoutError") for e in r.errors)]
    assert not seen, f"clients saw errors while hsm-a was down: {seen}"
    health = lab.member_health(lab.vip_holders("cara")[0])["body"]
    assert health["hsm"]["hsm-b"] is True
