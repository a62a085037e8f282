"""A signer killed mid-request: the request is not lost, not issued twice, and every signature is accounted for.

CARA runs as a real child process (`hapki serve cara`) with a fail point that SIGKILLs it at a precise step.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from hapki.cli.client import ClmClient
from hapki.clm.main import ClmRuntime
from hapki.contracts import subjects
from hapki.contracts.models import IssueCertificate, IssueReply, RequestStatus
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.bus import SIGNING_ACK_WAIT_SECONDS
from helpers.csr import make_csr, make_key
from integration.conftest import connected_client, query

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def clm(env: LocalEnv) -> AsyncIterator[ClmRuntime]:
    runtime = ClmRuntime(stack.clm_config(env, wait_seconds=1.0))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def client(env: LocalEnv, clm: ClmRuntime) -> AsyncIterator[ClmClient]:
    async with connected_client(env) as c:
        yield c


@pytest.fixture
def cara_process(env: LocalEnv, tmp_path: Path):
    config = stack.write_config(stack.cara_config(env), tmp_path / "cara.toml")
    child_env = {**os.environ, "SOFTHSM2_CONF": str(env.hsm.conf_path)}
    made: list[stack.ServiceProcess] = []

    def start(faults: str | None = None, *, supervise: bool = False,
              extra_env: dict[str, str] | None = None) -> stack.ServiceProcess:
        proc = stack.ServiceProcess("cara", config, tmp_path / f"cara-{len(made)}.log", child_env,
                                    supervise=supervise)
        made.append(proc)
        fault_env = {"HAPKI_FAULTS": faults, "HAPKI_FAULTS_DIR": str(tmp_path)} if faults else {}
        return proc.start(extra_env={**fault_env, **(extra_env or {})})

    yield start
    for proc in made:
        proc.kill()


async def _wait_dead(proc: stack.ServiceProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not proc.alive(), "the fail point did not fire"


async def _retry_until_issued(client: ClmClient, request: IssueCertificate, timeout: float = 30.0) -> IssueReply:
    deadline = time.monotonic() + timeout
    while True:
        reply = await client.issue(request)  # same idempotency key: a real client's retry
        assert reply.error is None, reply.error
        if reply.status is RequestStatus.ISSUED or time.monotonic() > deadline:
            return reply


def _request(name: str) -> IssueCertificate:
    csr_pem, _ = make_csr([name], key=make_key("p256", fresh=True), cn=name)
    return IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="crash-tests",
                            idempotency_key=uuid.uuid4().hex)


async def test_crash_between_sign_and_commit_abandons_the_intent_and_issues_once(client, cara_process, sql) -> None:
    crashing = cara_process("cara.after_sign=crash")
    request = _request("crash-sign.example.com")
    first = await client.issue(request)
    assert first.error is None and first.status is RequestStatus.PENDING
    await _wait_dead(crashing)
    intents = await query(sql, "SELECT state FROM signing_intents WHERE request_id = %s", (first.request_id,))
    assert intents == [("reserved",)], "the intent must be committed before the HSM signs"
    assert await query(sql, "SELECT 1 FROM certificates WHERE request_id = %s", (first.request_id,)) == []

    cara_process()  # restart, no fault: recovery + redelivery after ack_wait
    final = await _retry_until_issued(client, request)
    assert final.status is RequestStatus.ISSUED and final.request_id == first.request_id

    intents = await query(sql, "SELECT id, serial, state, resolution FROM signing_intents WHERE request_id = %s",
                          (first.request_id,))
    assert sorted(i[2] for i in intents) == ["abandoned", "issued"], intents
    certs = await query(sql, "SELECT serial, intent_id FROM certificates WHERE request_id = %s", (first.request_id,))
    assert len(certs) == 1
    issued = next(i for i in intents if i[2] == "issued")
    abandoned = next(i for i in intents if i[2] == "abandoned")
    assert certs[0] == (issued[1], issued[0]) == (final.serial, issued[0])
    assert abandoned[1] != final.serial and abandoned[3]  # the lost signature's serial is never reused


async def test_a_supervised_cara_is_forked_again_and_issues_once(client, cara_process, tmp_path, sql) -> None:
    """`hapki serve cara --supervise`: the signer dies between C_Sign and its commit; its supervisor, still
    running, forks it again without anyone's help, and the request is issued once, the lost signature abandoned."""
    arm = tmp_path / "arm-after-sign"
    arm.touch()
    supervised = cara_process("cara.after_sign=crash", supervise=True,
                              extra_env={"HAPKI_FAULTS_ARM_FILE": str(arm)})
    assert supervised.proc is not None
    log_text = lambda: supervised.log_path.read_text(errors="replace")  # noqa: E731

    async def disarm_after_the_crash() -> None:  # at once: the next child signs within ack_wait of the crash
        deadline = time.monotonic() + 20
        while "was killed by SIGKILL; starting it again" not in log_text():
            assert time.monotonic() < deadline and supervised.alive(), f"no restart:\n{log_text()[-3000:]}"
            await asyncio.sleep(0.005)
        arm.unlink()

    disarm = asyncio.create_task(disarm_after_the_crash())
    request = _request("crash-supervised.example.com")
    first = await client.issue(request)  # often ISSUED already: the next child signed within CLM's 1 s wait
    assert first.error is None, first.error
    await asyncio.wait_for(disarm, 30)
    final = await _retry_until_issued(client, request)
    assert final.status is RequestStatus.ISSUED and final.request_id == first.request_id
    assert supervised.alive(), "the supervisor itself must live on"
    assert log_text().count("hapki cara ready") == 2, log_text()[-3000:]  # the first child and the one after it
    intents = await query(sql, "SELECT state FROM signing_intents WHERE request_id = %s", (first.request_id,))
    assert sorted(state for (state,) in intents) == ["abandoned", "issued"], intents
    certs = await query(sql, "SELECT serial FROM certificates WHERE request_id = %s", (first.request_id,))
    assert certs == [(final.serial,)]


async def test_crash_between_commit_and_ack_redelivers_without_signing_again(env, client, cara_process, sql) -> None:
    crashing = cara_process("cara.after_commit=crash")
    request = _request("crash-ack.example.com")
    first = await client.issue(request)
    assert first.error is None
    await _wait_dead(crashing)
    stored = await query(sql, "SELECT serial, intent_id FROM certificates WHERE request_id = %s", (first.request_id,))
    assert len(stored) == 1

    cara_process()
    # The message was never acked: it comes back after ack_wait and must be answered from the database.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pending = await query(sql, "SELECT COUNT(*) FROM requests WHERE id = %s", (first.request_id,))
        assert pending == [(1,)]
        await asyncio.sleep(0.5)
        info = await _stream_pending(env)
        if info == 0:
            break
    final = await _retry_until_issued(client, request)
    assert (final.serial, final.request_id) == (stored[0][0], first.request_id)
    intents = await query(sql, "SELECT id, state FROM signing_intents WHERE request_id = %s", (first.request_id,))
    assert intents == [(stored[0][1], "issued")], "a redelivery must not sign a second time"


async def test_a_signing_held_longer_than_ack_wait_is_not_delivered_again(env, client, cara_process, tmp_path,
                                                                        sql) -> None:
    """While a batch is worked on, the signer reports its messages in progress: one held for many times ack_wait (here
    paused after the HSM signed) stays with it, delivered once, and its request is signed once."""
    paused = cara_process("cara.after_sign=pause")
    request = _request("slow-sign.example.com")
    first = await client.issue(request)
    assert first.error is None
    marker = tmp_path / "cara.after_sign"
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline and paused.alive(), "the signer did not reach the pause"
        await asyncio.sleep(0.05)
    await asyncio.sleep(6 * SIGNING_ACK_WAIT_SECONDS)
    consumer = await _consumer_info(env)
    assert (consumer.num_ack_pending, consumer.num_redelivered) == (1, 0), consumer

    paused.kill()
    cara_process()  # the message comes back after ack_wait; the new signer supersedes the paused one's intent
    final = await _retry_until_issued(client, request)
    assert final.status is RequestStatus.ISSUED
    intents = await query(sql, "SELECT state FROM signing_intents WHERE request_id = %s", (first.request_id,))
    assert sorted(state for (state,) in intents) == ["abandoned", "issued"], intents


async def _consumer_info(env: LocalEnv) -> Any:
    nc = await nats.connect(**env.nats.connect_kwargs())
    try:
        return await nc.jetstream().consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER)
    finally:
        await nc.close()


async def _stream_pending(env: LocalEnv) -> int:
    """Messages still in the signing work queue (acked ones are removed), read as admin."""
    nc = await nats.connect(**env.nats.connect_kwargs())
    try:
        info = await nc.jetstream().stream_info("PKI_SIGNING")
        return info.state.messages
    finally:
        await nc.close()
