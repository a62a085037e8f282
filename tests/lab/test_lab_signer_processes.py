"""CARA members with two signer processes each (HAPKI_SIGNER_PROCESSES=2) in the HA lab: the active member's
worker signs too, and a crash of the active member (its worker with it) still issues every request exactly once."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hapki.cara.config import SIGNER_PROCESSES_ENV
from hapki.cli.client import new_key_and_csr
from hapki.cli.procstat import with_descendants
from hapki.lab.cluster import wait_until
from hapki.lab.ha import Lab
from hapki.runtime.invariants import new_rows
from hapki.lab.load import Load, crash_member, database_facts, read_violations

pytestmark = pytest.mark.lab

CSRS = [new_key_and_csr([f"lab-procs-{i}.example.com"])[0].decode() for i in range(16)]


@pytest.fixture
def two_signers(lab: Lab) -> Iterator[Lab]:
    names = [f"cara@{member}" for member in lab.topo.members_of_tier("cara")]
    try:
        for name in names:
            lab.set_env(name, {SIGNER_PROCESSES_ENV: "2"})
        # Restarting the members one after the other moves the CARA VIP away and back: wait until it is home and
        # its member signs, or the test may take a member that is about to lose the VIP for the active one (it
        # failed so once in CI: the VIP left the member it had just read, whose worker then signed nothing).
        lab.wait_steady(timeout=60.0)
        yield lab
    finally:
        for name in names:
            lab.set_env(name, {SIGNER_PROCESSES_ENV: None})


def _workers(lab: Lab, member: str) -> list[int]:
    pid = lab.procs.pid(f"cara@{member}")
    assert pid is not None, f"cara@{member} is not running"
    return [p for p in with_descendants([pid]) if p != pid
            and "hapki.cara.signer_worker" in Path(f"/proc/{p}/cmdline").read_text()]


def _workers_of(parent: int | None) -> list[int]:
    """Signer workers started by `parent`, wherever they are now (an orphan has another parent)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_text().split("\0")
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            continue
        if "hapki.cara.signer_worker" in argv and "--parent-pid" in argv \
                and argv[argv.index("--parent-pid") + 1:][:1] == [str(parent)]:
            found.append(int(proc.name))
    return found


def _signed_by_worker(lab: Lab, member: str) -> float:
    """hapki_cara_signer_signatures of `member`'s worker 1, as the lab's Prometheus last scraped it."""
    promql = f'hapki_cara_signer_signatures{{pki_member="{member}",pki_signer="1"}}'
    with urllib.request.urlopen(f"{lab.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}",
                                timeout=5) as response:
        result = json.loads(response.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_two_signer_processes_sign_and_a_member_crash_loses_nothing(two_signers: Lab, timing) -> None:
    lab = two_signers
    active = lab.vip_holders("cara")[0]
    other = next(m for m in lab.topo.members_of_tier("cara") if m != active)
    assert len(_workers(lab, active)) == 1 and len(_workers(lab, other)) == 1
    crashed_pid = lab.procs.pid(f"cara@{active}")

    before = asyncio.run(read_violations(lab))

    async def run() -> tuple[Load, float]:
        async with Load(lab, CSRS, 40.0) as load:
            driver = asyncio.create_task(load.run(8.0, give_up_after=30.0))
            await asyncio.sleep(4.0)
            # The active member's worker has signed some by now (Prometheus scrapes every 2 s).
            signed = await asyncio.to_thread(wait_until, lambda: _signed_by_worker(lab, active) > 0, 10.0, 0.5)
            assert signed is not None, "the active member's signer worker signed nothing"
            crashed_at = await asyncio.to_thread(crash_member, lab, active)
            await driver
        return load, crashed_at

    load, crashed_at = asyncio.run(run())
    facts = asyncio.run(database_facts(lab, [r.key for r in load.requests], active, crashed_at))

    per_key = facts["requests"]
    assert all(r.serial for r in load.requests), [(r.key, r.errors) for r in load.requests if not r.serial][:5]
    assert all(per_key[r.key][1] == "issued" and per_key[r.key][2] == 1 for r in load.requests)
    assert len({r.serial for r in load.requests}) == len(load.requests)
    assert {name: rows for name, rows in new_rows(before, asyncio.run(read_violations(lab))).items() if rows} == {}
    assert wait_until(lambda: not _workers_of(crashed_pid), 10.0, 0.2) is not None, "an orphan worker survived"
    first = facts["first_signature"].get(other)
    assert first is not None, "the other member never signed"
    timing("cara.two_processes.crash.first_signature_after_fault", first - crashed_at)
