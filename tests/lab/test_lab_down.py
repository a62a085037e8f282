"""`hapki lab down` (a separate process) leaves nothing behind: no namespace, no host veth, no lab process.

Runs after every other lab test (see conftest.py): it takes the session's lab down.
"""

from __future__ import annotations

import subprocess

import pytest
from hapki.lab import local
from hapki.lab.ha import Lab
from hapki.lab.network import list_namespaces
from hapki.lab.stack import hapki_command

pytestmark = pytest.mark.lab


def test_lab_down_leaves_nothing(lab: Lab) -> None:
    lab.procs.load()
    pids = {name: [*lab.procs.pids(name)] for name in lab.procs.procs}
    assert pids and all(pids.values()), "every recorded process runs before the test"

    result = subprocess.run([*hapki_command(), "lab", "down", "--dir", str(lab.base_dir)],
                            check=False, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr

    prefix = f"{lab.topo.lab.prefix}-"
    assert [ns for ns in list_namespaces() if ns.startswith(prefix) and not ns.startswith(f"{prefix}test-")] == []
    host_link = subprocess.run(["ip", "link", "show", lab.topo.host_interface], check=False, capture_output=True)
    assert host_link.returncode != 0, "host veth still there"
    routes = subprocess.run(["ip", "route", "show", str(lab.topo.lab_network())], check=False, capture_output=True,
                            text=True)
    assert routes.stdout.strip() == ""
    alive = {name: [p for p in ps if local._pid_running(p)] for name, ps in pids.items()}
    assert {name: ps for name, ps in alive.items() if ps} == {}
