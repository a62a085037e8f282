"""The whole site losing power: every Galera node of the lab runs with the settings that keep a commit through it
(`hapki db check`, hapki.runtime.durability), as the compose demo's rendered configs do. The crash and reboot of
the whole site under load is the fault suite's scenario site-crash (test_chaos.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from hapki.cli.client import ClmClient, new_key_and_csr
from hapki.contracts.models import RevocationReason, RevokeCertificate
from hapki.lab.ha import Lab
from hapki.lab.load import Load
from hapki.lab.cluster import wait_until
from helpers.cli import database_config_file, hapki

pytestmark = pytest.mark.lab

CSRS = [new_key_and_csr([f"site-{i}.example.com"])[0].decode() for i in range(4)]


def _issue(lab: Lab, count: int) -> list[str]:
    """`count` certificates through the CLM VIP (NATS and HTTPS); their serials."""

    async def run() -> Load:
        async with Load(lab, CSRS, rate=10.0) as load:
            await load.run(count / 10.0, give_up_after=60.0)
        return load

    load = asyncio.run(run())
    assert all(r.serial for r in load.requests), [r.errors for r in load.requests]
    return [r.serial for r in load.requests if r.serial]


def _max_crl_number(lab: Lab, issuer: str) -> int:
    out = lab.galera.nodes[0].sql(f"SELECT COALESCE(MAX(crl_number), 0) FROM hapki.crls WHERE issuer = '{issuer}'")
    return int(out.strip())


def _revoke(lab: Lab, serial: str) -> None:
    async def run() -> None:
        client = await ClmClient.connect(lab.client_nats_config(), timeout=10.0)
        try:
            reply = await client.revoke(RevokeCertificate(serial=serial, reason=RevocationReason.KEY_COMPROMISE,
                                                          requester="lab-demo"))
            assert reply.error is None, reply.error
        finally:
            await client.close()

    asyncio.run(run())


def test_every_galera_node_runs_with_the_settings_that_keep_commits_through_a_power_cut(lab: Lab, tmp_path: Path) -> None:
    config = database_config_file(lab.database_config(), tmp_path / "admin.toml")
    done = hapki("db", "check", "--config", str(config), "--json")
    report = json.loads(done.stdout)["durability"]
    assert sorted(report) == sorted(f"{node.address}:{node.port}" for node in lab.galera.nodes), report
    for node, found in report.items():
        assert found["ok"], (node, found)
        assert found["settings"]["innodb_flush_log_at_trx_commit"] == "1", (node, found)


def test_every_galera_node_killed_at_once_comes_back_without_a_bootstrap(lab: Lab) -> None:
    """All three nodes SIGKILLed together (their host lost power, the services' hosts did not): started again, all
    at once from their recovered positions, they re-form the Primary Component from the view they saved
    (pc.recovery); nobody runs --wsrep-new-cluster. The services reconnect and issue, no request lost."""
    offsets = {node.name: node.log_path.stat().st_size for node in lab.galera.nodes}
    for node in lab.galera.nodes:
        lab.kill_data_node(f"galera@{node.name}")
    began = time.monotonic()
    lab.restart_galera_nodes([f"galera@{node.name}" for node in lab.galera.nodes], bootstrap_if_stuck=False)
    took = time.monotonic() - began
    logs = {node.name: node.log_path.read_bytes()[offsets[node.name]:].decode(errors="replace")
            for node in lab.galera.nodes}
    assert all("restore pc from disk successfully" in text for text in logs.values()), "a node lost its saved view"
    assert any("promote to primary component" in text for text in logs.values())
    lab.wait_steady(90)

    async def issue() -> Load:
        async with Load(lab, CSRS, rate=10.0) as load:
            await load.run(1.0, give_up_after=30.0)
        return load

    load = asyncio.run(issue())
    assert all(r.serial for r in load.requests), [r.errors for r in load.requests]
    assert took < 60, took


def test_the_whole_database_lost_and_restored_from_a_backup(lab: Lab, tmp_path: Path) -> None:
    """Every Galera node's disk lost while the services run: a fresh cluster, `hapki db restore` of the backup, and
    the running services issue, revoke and publish again by themselves. What was issued after the backup is gone
    (the backup's age is what a restore loses), but no CRL number published before the loss is used again."""
    config = database_config_file(lab.database_config(), tmp_path / "admin.toml")
    kept = _issue(lab, 10)
    backup = tmp_path / "site.sql.gz"
    done = hapki("db", "backup", "--config", str(config), "--out", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    lost = _issue(lab, 10)
    issuer = lab.galera.nodes[0].sql(f"SELECT issuer FROM hapki.certificates WHERE serial = '{lost[0]}'").strip()
    published = _max_crl_number(lab, issuer)
    _revoke(lab, lost[0])  # a CRL after the backup: its number must not come back
    assert wait_until(lambda: _max_crl_number(lab, issuer) > published, 30, 0.5) is not None, \
        "no CRL listing the revocation within 30 s"
    newest_lost_crl = _max_crl_number(lab, issuer)

    for node in lab.galera.nodes:
        lab.kill_data_node(f"galera@{node.name}")
        shutil.rmtree(node.datadir)
    # The operator's procedure (docs/ARCHITECTURE.md): the services stop first, or they would write into the empty
    # database (an active CARA member bumps its epoch there), and the restore would refuse it as a site's data.
    services = [name for name in lab.procs.names() if lab.procs.procs[name].kind in ("cara", "clm")]
    lab.procs.stop_many(services)
    lab.galera.start()  # node 1 bootstraps an empty cluster (users, schema, grants), the others join by SST
    lab._record_data_nodes(lab.galera.nodes, "galera", lambda n: n.cnf_path)
    done = hapki("db", "restore", "--config", str(config), "--backup", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invariants: ok; audit:" in done.stdout
    for name in services:
        lab.start(name)

    lab.wait_steady(120)
    again = _issue(lab, 10)
    serials = set(lab.galera.nodes[1].sql("SELECT serial FROM hapki.certificates").split())
    assert set(kept) <= serials and set(again) <= serials
    assert not set(lost) & serials, "issued after the backup: not in it"
    _revoke(lab, again[0])
    assert wait_until(lambda: _max_crl_number(lab, issuer) > newest_lost_crl, 30, 0.5) is not None, \
        "no CRL numbered above every one published before within 30 s"
    verified = hapki("audit", "verify", "--config", str(config))
    assert verified.returncode == 0, verified.stdout + verified.stderr
