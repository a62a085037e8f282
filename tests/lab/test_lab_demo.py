"""`make demo` (`hapki lab demo`), the README's first command: the lab up, load through a crash of the active CA
member, the timeline, the lab down. Runs after test_lab_down (tests/lab/conftest.py): one lab per host."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hapki.lab.ha import Lab
from hapki.lab.network import list_namespaces
from hapki.lab.stack import hapki_command

pytestmark = pytest.mark.lab


def test_the_demo_survives_its_crash_and_leaves_nothing(namespaces_work: None, tmp_path: Path) -> None:
    base = tmp_path / "demo-lab"
    result = subprocess.run([*hapki_command(), "lab", "demo", "--dir", str(base)], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "every request completed exactly once" in out, out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"sent"')))
    assert summary["sent"] > 0 and summary["issued"] == summary["sent"], summary
    assert summary["lost"] == 0 and summary["duplicated"] == 0, summary
    assert "first signature on cara-2" in out and "cara.sign" in out  # the timeline and a trace after the failover
    prefix = Lab(base).topo.lab.prefix
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{prefix}-")]  # down: nothing left
