"""Services started before their database and bus (a whole site booting at once) wait for them: `hapki serve
--supervise` processes of CARA and CLM whose MariaDB and NATS are unreachable stay up, say what they wait for,
and serve once both appear, without a crash loop of their supervisors (hapki.runtime.startup)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest

from hapki.contracts.models import IssueCertificate, RequestStatus
from hapki.lab import stack
from hapki.lab.local import LocalEnv, free_port
from helpers.csr import make_csr, make_key
from helpers.relay import Relay
from integration.conftest import connected_client

pytestmark = pytest.mark.integration

WAITING = "not started, something it needs is not available yet"


def _behind(config, db: Relay, bus: Relay):  # type: ignore[no-untyped-def]
    return config.model_copy(update={
        "database": config.database.model_copy(update={"nodes": [db.node]}),
        "nats": config.nats.model_copy(update={"servers": [f"nats://{bus.node}"]}),
    })


async def _until_logged(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{path.name} did not log {text!r} within {timeout:.0f} s:\n"
                         f"{path.read_text(errors='replace')[-3000:] if path.exists() else '(no log)'}")


async def test_services_started_before_their_database_and_bus_wait_for_them(env: LocalEnv, tmp_path: Path) -> None:
    db = Relay(stack.database_config(env).nodes[0], port=free_port())
    bus = Relay(f"127.0.0.1:{env.nats.port}", port=free_port())
    child_env = {**os.environ, "SOFTHSM2_CONF": str(env.hsm.conf_path)}
    procs = {
        name: stack.ServiceProcess(name, stack.write_config(_behind(config, db, bus), tmp_path / f"{name}.toml"),
                                   tmp_path / f"{name}.log", child_env, supervise=True)
        for name, config in (("cara", stack.cara_config(env)), ("clm", stack.clm_config(env)))
    }
    starting = {name: asyncio.create_task(asyncio.to_thread(proc.start, 120.0)) for name, proc in procs.items()}
    try:
        for name in procs:
            await _until_logged(tmp_path / f"{name}.log", WAITING, 60)
        await asyncio.sleep(2)
        assert all(proc.alive() for proc in procs.values()), "a service gave up while its dependencies were down"
        assert not any(task.done() for task in starting.values()), "ready without a database and a bus"

        await db.start()
        await bus.start()
        for task in starting.values():
            await asyncio.wait_for(task, 90)

        async with connected_client(env) as client:
            reply = await client.issue(IssueCertificate(
                csr_pem=make_csr(["waited.example.com"], key=make_key("p256", fresh=True))[0], profile="tls-server",
                requester="startup-wait",
                idempotency_key=uuid.uuid4().hex))
            assert reply.status == RequestStatus.ISSUED, reply
        for name in procs:
            text = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "exited with status" not in text, f"{name}'s supervisor restarted it:\n{text[-3000:]}"
            assert f"hapki {name}: started at attempt" in text
    finally:
        for task in starting.values():
            task.cancel()
        for proc in procs.values():
            proc.stop()
        db.stop()
        bus.stop()


async def test_a_start_error_that_waiting_cannot_fix_still_stops_the_service(env: LocalEnv, tmp_path: Path) -> None:
    """A pinned issuer that does not exist is the operator's to fix: no waiting, the supervisor sees it fail."""
    config = stack.write_config(stack.cara_config(env, issuer="no-such-issuer"), tmp_path / "cara.toml")
    proc = stack.ServiceProcess("cara", config, tmp_path / "cara.log", {**os.environ,
                                "SOFTHSM2_CONF": str(env.hsm.conf_path)})
    with pytest.raises(RuntimeError, match="did not become ready"):
        await asyncio.to_thread(proc.start, 60.0)
    text = (tmp_path / "cara.log").read_text(errors="replace")
    assert "no-such-issuer" in text and WAITING not in text
