"""`hapki lab restart NAME`: one process of the running lab restarted by a short-lived command, which it outlives
(the lab's processes are detached from the command that starts them), ready when the command returns; a service
with environment changes that stay until changed again."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hapki.lab.ha import Lab
from hapki.lab.stack import hapki_command

MARK = "HAPKI_RESTART_TEST_MARK"


def restart(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*hapki_command(), "lab", "restart", *args, "--dir", str(lab.base_dir)],
                          check=False, capture_output=True, text=True, timeout=120)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def test_a_restarted_service_outlives_the_command_with_its_new_environment(lab: Lab) -> None:
    name = "clm@clm-2"
    before = lab.procs.pid(name)
    assert before is not None
    done = restart(lab, name, "--env", f"{MARK}=1")
    assert done.returncode == 0, done.stderr
    lab.procs.load()
    after = lab.procs.pid(name)
    assert after is not None and after != before
    assert f"{name} restarted in" in done.stdout and f"pid {after}" in done.stdout
    assert environ(after).get(MARK) == "1"
    assert lab.member_health("clm-2")["status"] == 200  # ready when the command returned, and still up
    # The change stays through a plain restart and goes when removed.
    assert restart(lab, name).returncode == 0
    lab.procs.load()
    assert environ(lab.procs.pid(name) or 0).get(MARK) == "1"
    assert restart(lab, name, "--env", f"{MARK}=").returncode == 0
    lab.procs.load()
    pid = lab.procs.pid(name)
    assert pid is not None and MARK not in environ(pid)
    assert lab.member_health("clm-2")["status"] == 200


def test_what_cannot_be_restarted_is_named(lab: Lab) -> None:
    unknown = restart(lab, "clm@clm-9")
    assert unknown.returncode == 1 and "the lab has no process clm@clm-9" in unknown.stderr
    data = restart(lab, "galera@db-1")
    assert data.returncode == 1 and "galera@db-1 is a data-tier node" in data.stderr
    not_a_service = restart(lab, "keepalived@clm-2", "--env", f"{MARK}=1")
    assert not_a_service.returncode == 1 and "only a service" in not_a_service.stderr
    malformed = restart(lab, "clm@clm-2", "--env", "NOEQUALS")
    assert malformed.returncode == 2 and "KEY=VALUE" in malformed.stderr
