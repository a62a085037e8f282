"""The whole site losing power: every Galera node of the lab runs with the settings that keep a commit through it
(`hapki db check`, hapki.runtime.durability), as the compose demo's rendered configs do. The crash and reboot of
the whole site under load is the fault suite's scenario site-crash (test_chaos.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import tomli_w
from hapki.lab.ha import Lab
from hapki.lab.stack import hapki_command


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
