"""hapki.lab.cluster.ProcessTable: telling a process that is starting from one that is gone."""

from __future__ import annotations

import sys
from pathlib import Path

from hapki.lab import cluster
from hapki.lab.cluster import ProcessTable


def test_a_started_process_whose_command_line_reads_empty_for_a_moment_has_not_exited(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Right after exec the kernel may not have set the new command line yet: the marker check reads it empty. The
    lab took that for an exit (Prometheus's first start, on a cold page cache) and started a second copy."""
    table = ProcessTable(tmp_path / "state.json")
    marker = str(tmp_path / "marker.toml")
    table.launch("sleeper@host", [sys.executable, "-c", "import time; time.sleep(30)", marker],
                         tmp_path / "sleeper.log", marker=marker)
    try:
        assert not table.exited("sleeper@host")
        empty_reads = [1, 2]  # the command line reads empty twice, then as it is
        real = cluster._cmdline  # noqa: SLF001

        def cmdline(pid: int) -> str:
            return "" if empty_reads and empty_reads.pop() else real(pid)

        monkeypatch.setattr(cluster, "_cmdline", cmdline)
        assert not table.alive("sleeper@host")  # what the single check used to conclude from
        assert not table.exited("sleeper@host")
        table.stop("sleeper@host", timeout=5.0)
        assert table.exited("sleeper@host", grace=0.2)
    finally:
        table.stop("sleeper@host", timeout=1.0)


def test_the_start_marker_names_the_program_past_its_wrappers_to_the_millisecond() -> None:
    from hapki.lab.local import start_marker

    when = 1795838000.25
    wrapped = ["ip", "netns", "exec", "hapki-cara-1", "env", "HAPKI_SIGNER_PROCESSES=2", "/w/.venv/bin/python", "-m",
               "hapki.cli.main", "serve", "cara"]
    assert start_marker(wrapped, when).startswith("--- hapki.lab: starting hapki.cli.main at ")
    assert start_marker(wrapped, when).endswith(",250 ---")
    assert "starting keepalived at" in start_marker(["ip", "netns", "exec", "ns", "keepalived", "-n"], when)
    assert "starting nats-server at" in start_marker(["env", "GOMAXPROCS=1", "/x/nats-server", "-c", "f"], when)
    assert "starting mariadbd at" in start_marker(["/usr/sbin/mariadbd", "--defaults-file=x"], when)
