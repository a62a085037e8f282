"""Several signer processes on the active member (`[signer] processes`), against real NATS, MariaDB and SoftHSM.

The main CARA process runs in this test process; its signer workers are real child processes
(`python -m hapki.cara.signer_worker`), each with its own database pool, bus connection and PKCS#11 session.
Requests are recorded and approved as CLM does, then published straight into the signing stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from hapki.cara.config import SignerConfig
from hapki.cara.issuance import random_serial, serial_hex
from hapki.cara.main import CaraRuntime
from hapki.cara.signer import Signer
from hapki.cara.signer_processes import SignerProcesses
from hapki.cara.store import MariaDBSigningStore
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts.models import SignCertificate
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.clock import utcnow
from helpers.signing import PROFILES, publish_signing_request, recorded_request
from integration.conftest import query
from telemetry_fixture import memory_exporter

pytestmark = pytest.mark.integration

PROCESSES = 3
# Small batches, one at a time per process: a burst of requests is shared out among the processes.
SPREAD = SignerConfig(processes=PROCESSES, batch=2, batches_in_flight=1)


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
async def cara(env: LocalEnv) -> AsyncIterator[CaraRuntime]:
    """CARA with three signer processes, active (no VIP configured: it signs from start())."""
    memory_exporter()
    runtime = CaraRuntime(stack.cara_config(env, signer=SPREAD))
    await runtime.start()
    try:
        yield runtime
    finally:
        signers = runtime.signers
        pids = [slot.pid for slot in signers.workers] if signers else []
        await runtime.stop()
        assert pids and not any(pid is not None and _alive(pid) for pid in pids), "stop() must reap the workers"


@pytest.fixture
async def clm_bus(env: LocalEnv) -> AsyncIterator[Any]:
    nc = await nats.connect(**env.nats.connect_kwargs("clm"))
    try:
        yield nc
    finally:
        await nc.close()


def _group(cara: CaraRuntime) -> SignerProcesses:
    assert cara.signers is not None
    return cara.signers


async def _publish(env: LocalEnv, store: MariaDBRequestStore, nc: Any, prefix: str, n: int) -> list[SignCertificate]:
    key = stack.approval_keys(env.base_dir / "approval")[0]
    requests = [await recorded_request(key, store, f"{prefix}-{i}.example.com", "processes-tests") for i in range(n)]
    for request in requests:
        await publish_signing_request(nc, request)
    return requests


async def _certificates(sql: Any, requests: list[SignCertificate]) -> list[tuple]:
    ids = [r.request_id for r in requests]
    return await query(sql, f"SELECT c.request_id, c.serial, c.epoch FROM certificates c WHERE c.request_id IN"
                            f" ({', '.join(['%s'] * len(ids))})", ids)


async def _intents(sql: Any, requests: list[SignCertificate]) -> list[tuple]:
    ids = [r.request_id for r in requests]
    return await query(sql, f"SELECT request_id, epoch, state FROM signing_intents WHERE request_id IN"
                            f" ({', '.join(['%s'] * len(ids))})", ids)


async def _wait_certificates(sql: Any, requests: list[SignCertificate], timeout: float = 60.0) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        certs = await _certificates(sql, requests)
        if len({row[0] for row in certs}) == len(requests) or time.monotonic() > deadline:
            return certs
        await asyncio.sleep(0.1)


async def test_workers_follow_the_epoch_without_bumping_it(cara, sql) -> None:
    group = _group(cara)
    await _until(lambda: all(slot.state == "active" for slot in group.workers), 30, "every worker active")
    assert len(group.workers) == PROCESSES - 1 and group.active
    assert {slot.epoch for slot in group.workers} == {group.epoch}
    # One bump (the main signer's start), none by the workers: they would have fenced their own member out.
    assert await query(sql, "SELECT epoch, holder FROM epochs WHERE tier = 'cara'") == [(group.epoch, "cara-1")]
    assert await query(sql, "SELECT COUNT(*) FROM epoch_changes WHERE tier = 'cara'") == [(group.epoch,)]
    assert len({slot.pid for slot in group.workers} | {os.getpid()}) == PROCESSES


async def test_every_request_is_issued_once_and_every_process_signs(env, cara, clm_store, clm_bus, sql) -> None:
    group = _group(cara)
    await _until(lambda: all(slot.state == "active" for slot in group.workers), 30, "every worker active")
    before = [group._signer.signatures, *(slot.total_signatures for slot in group.workers)]  # noqa: SLF001
    requests = await _publish(env, clm_store, clm_bus, "spread", 60)

    certs = await _wait_certificates(sql, requests)

    assert sorted(row[0] for row in certs) == sorted(r.request_id for r in requests), "exactly one each"
    assert len({row[1] for row in certs}) == len(requests)
    assert {row[2] for row in certs} == {group.epoch}
    intents = await _intents(sql, requests)
    assert {state for _, _, state in intents} <= {"issued", "abandoned"}, intents
    assert sorted(rid for rid, _, state in intents if state == "issued") == sorted(r.request_id for r in requests)
    # Each process signed some of them (the workers' counts reach the parent within a second).
    await _until(lambda: sum(slot.total_signatures for slot in group.workers) + group._signer.signatures  # noqa: SLF001
                 - sum(before) >= len(requests), 10, "every signature reported")
    after = [group._signer.signatures, *(slot.total_signatures for slot in group.workers)]  # noqa: SLF001
    made = [a - b for a, b in zip(after, before, strict=True)]
    assert all(n > 0 for n in made), f"signatures per process (main first): {made}"
    assert sum(made) == len(intents), "every signature has its intent"


async def test_recovery_at_start_leaves_the_intents_of_the_current_epoch_alone(env, cara, clm_store, sql) -> None:
    """start() resolves stale intents (abandon_stale_intents): only older epochs', never a sibling worker's live
    intent of the epoch the member holds now."""
    assert cara.db is not None and cara.signer is not None
    [(epoch,)] = await query(sql, "SELECT epoch FROM epochs WHERE tier = 'cara'")
    key = stack.approval_keys(env.base_dir / "approval")[0]
    live, stale = [await recorded_request(key, clm_store, f"{name}.example.com", "processes-tests")
                   for name in ("live-intent", "stale-intent")]
    store = MariaDBSigningStore(cara.db, actor="cara:cara-1")
    issuer = cara.signer.issuer.name
    await store.reserve(intent_id=uuid.uuid4().hex, request_id=live.request_id, issuer=issuer,
                        serial=serial_hex(random_serial()), epoch=epoch, member="cara-1", now=utcnow())
    await query(sql, "INSERT INTO signing_intents (id, request_id, issuer, serial, epoch, member, state, created_at)"
                     " VALUES (%s, %s, %s, %s, %s, 'cara-1', 'reserved', NOW())",
                (uuid.uuid4().hex, stale.request_id, issuer, serial_hex(random_serial()), epoch - 1))

    assert await store.abandon_stale_intents(epoch, utcnow()) >= 1

    assert [row[2] for row in await _intents(sql, [live])] == ["reserved"]
    assert [row[2] for row in await _intents(sql, [stale])] == ["abandoned"]
    await store.abandon_intent((await query(sql, "SELECT id FROM signing_intents WHERE request_id = %s",
                                            (live.request_id,)))[0][0], "test over", utcnow())


async def test_a_newer_epoch_stops_every_process_from_committing(env, cara, clm_store, clm_bus, sql) -> None:
    """Split brain: another member bumps the epoch. No process of ours commits after that; the other member issues
    each request once, and our intents (if any were reserved before the bump) end abandoned."""
    group = _group(cara)
    await _until(lambda: all(slot.state == "active" for slot in group.workers), 30, "every worker active")
    ours = group.epoch
    assert cara.db is not None
    other = MariaDBSigningStore(cara.db, actor="cara:cara-2")
    await other.bump_epoch("cara-2", utcnow())

    requests = await _publish(env, clm_store, clm_bus, "fenced", 12)
    await _until(lambda: not group.active and not any(slot.state == "active" for slot in group.workers), 30,
                 "every process of the stale member passive")
    assert await _certificates(sql, requests) == []
    assert [row for row in await _intents(sql, requests) if row[1] == ours] == []  # the reservation was fenced too

    # The member with the current epoch gets every message back and issues each request once.
    successor = Signer(
        nc=cara.nc, js=cara.nc.jetstream(), store=other, issuer=cara.signer.issuer,  # type: ignore[union-attr]
        issuer_key=cara.signer.issuer_key, member="cara-2", config=SignerConfig(),  # type: ignore[union-attr]
        clock=utcnow, approvals=ApprovalVerifier.from_files(cara.config.approval_public_keys), profiles=PROFILES)
    newest = await successor.start()
    try:
        certs = await _wait_certificates(sql, requests)
    finally:
        await successor.stop()
    assert sorted(row[0] for row in certs) == sorted(r.request_id for r in requests)
    assert {row[2] for row in certs} == {newest}
    assert not group.active and all(slot.state != "active" for slot in group.workers)

    # Our member becomes active again (its role supervisor would, after its back-off): the workers follow.
    epoch = await group.start()
    assert epoch == newest + 1
    await _until(lambda: all(slot.state == "active" and slot.epoch == epoch for slot in group.workers), 30,
                 "every worker active under the new epoch")


async def test_a_killed_worker_is_started_again_and_loses_nothing(env, cara, clm_store, clm_bus, sql) -> None:
    group = _group(cara)
    if not group.active:
        await group.start()
    await _until(lambda: all(slot.state == "active" for slot in group.workers), 30, "every worker active")
    victim = group.workers[0]
    pid, starts = victim.pid, victim.starts
    assert pid is not None
    requests = await _publish(env, clm_store, clm_bus, "killed", 30)
    os.kill(pid, signal.SIGKILL)  # messages it held come back after ack_wait; its reserved intents are superseded

    certs = await _wait_certificates(sql, requests)

    assert sorted(row[0] for row in certs) == sorted(r.request_id for r in requests)
    await _until(lambda: victim.starts == starts + 1 and victim.state == "active", 30, "the worker back")
    assert victim.pid not in (None, pid)
    # Invariant 4: every intent of these requests ends issued or abandoned (a superseded one is abandoned).
    intents = await _intents(sql, requests)
    assert {state for _, _, state in intents} <= {"issued", "abandoned"}, intents


async def test_a_crashed_parent_leaves_no_worker_behind(env, tmp_path) -> None:
    """`hapki serve cara` with HAPKI_SIGNER_PROCESSES=2: SIGKILL it, and its worker exits too (PR_SET_PDEATHSIG)."""
    config = stack.write_config(stack.cara_config(env), tmp_path / "cara.toml")
    child_env = {**os.environ, "SOFTHSM2_CONF": str(env.hsm.conf_path), "HAPKI_SIGNER_PROCESSES": "2"}
    proc = stack.ServiceProcess("cara", config, tmp_path / "cara.log", child_env).start()
    try:
        assert proc.pid is not None
        workers = _children(proc.pid)
        assert len(workers) == 1, f"one signer worker expected, children: {workers}"
        assert "hapki.cara.signer_worker" in Path(f"/proc/{workers[0]}/cmdline").read_text()
        proc.kill()
        deadline = time.monotonic() + 15
        while _alive(workers[0]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not _alive(workers[0]), "the worker outlived its parent"
    finally:
        proc.kill()
    log = (tmp_path / "cara.log").read_text()
    assert "[cara-1 signer 1]" in log  # the worker's lines carry the member and its index
