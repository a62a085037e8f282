"""The whole site losing power: every Galera node of the lab runs with the settings that keep a commit through it
(`hapki db check`, hapki.runtime.durability), as the compose demo's rendered configs do. The crash and reboot of
the whole site under load is the fault suite's scenario site-crash (test_chaos.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w
from hapki.cli.client import new_key_and_csr
from hapki.lab.ha import Lab
from hapki.lab.load import Load
from hapki.lab.stack import hapki_command

pytestmark = pytest.mark.lab

CSRS = [new_key_and_csr([f"site-{i}.example.com"])[0].decode() for i in range(4)]


def test_every_galera_node_keeps_its_commits_through_a_power_cut(lab: Lab, tmp_path: Path) -> None:
    config = tmp_path / "admin.toml"
    config.write_text(tomli_w.dumps({"database": lab.database_config().model_dump(mode="json", exclude_none=True)}))
    done = subprocess.run([*hapki_command(), "db", "check", "--config", str(config), "--json"],
                          check=False, capture_output=True, text=True, timeout=120)
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
