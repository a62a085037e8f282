"""CPU and memory accounting from /proc: a busy child is charged to its parent's group, RSS peaks are read."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hapki.cli import procstat

BUSY = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\nimport sys; sys.stdin.read()"


def test_cpu_seconds_of_this_process_grows_and_of_a_missing_one_is_none() -> None:
    before = procstat.cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert procstat.cpu_seconds(os.getpid()) > before
    assert procstat.cpu_seconds(None) is None and procstat.cpu_seconds(2**22 + 12345) is None


def test_a_group_is_charged_for_a_busy_grandchild() -> None:
    # parent (a shell that waits: `; :` keeps it from exec'ing) -> child (python: 0.4 s of CPU, then reads stdin)
    shell = subprocess.Popen(["/bin/sh", "-c", '"$1" -c "$0"; :', BUSY, sys.executable], stdin=subprocess.PIPE)
    try:
        groups = procstat.ProcessGroups({"svc": [shell.pid], "nobody": [None], "shell": [shell.pid]}, alone=["shell"])
        groups.start()
        deadline = time.monotonic() + 10
        cpu = {}
        while time.monotonic() < deadline:
            time.sleep(0.1)
            cpu = groups.stop()
            if cpu["svc"] >= 0.35:
                break
        assert cpu["svc"] >= 0.35, cpu
        assert len(procstat.with_descendants([shell.pid])) == 2
        assert cpu["nobody"] == 0 and cpu["shell"] < 0.1  # the shell alone, without its busy child
        rss = groups.peak_rss_mib()
        assert rss["svc"] is not None and rss["svc"] > 1 and rss["nobody"] is None
    finally:
        shell.stdin.close()
        shell.wait(10)


def test_per_issuance_ms() -> None:
    assert procstat.per_issuance_ms({"clm": 2.0, "cara": 0.5}, 1000) == {"clm": 2.0, "cara": 0.5}
    assert procstat.per_issuance_ms({"clm": 2.0}, 0) == {"clm": None}


def test_machine_busy_seconds_is_monotonic() -> None:
    first = procstat.machine_busy_seconds()
    assert procstat.machine_busy_seconds() >= first > 0


def test_resident_memory_now_and_at_its_peak_of_this_process_and_of_none() -> None:
    assert 0 < procstat.rss_mib(os.getpid()) <= procstat.peak_rss_mib(os.getpid())
    assert procstat.rss_mib(2**22 + 7) is None and procstat.rss_mib(None) is None
