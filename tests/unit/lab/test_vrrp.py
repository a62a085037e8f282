"""A member's effective VRRP priority, read from its keepalived log (hapki.lab.vrrp)."""

from __future__ import annotations

from pathlib import Path

from hapki.lab.vrrp import effective_priority, since_last_start

START = "Sat Nov 28 03:15:07 2026: Starting Keepalived v2.2.7 (01/16,2022)\n"
FAILED = ("Sat: Script `hapki_cara_fit` now returning 7\n"
          "Sat: VRRP_Script(hapki_cara_fit) failed (exited with status 7)\n"
          "Sat: (hapki_cara) Changing effective priority from 150 to 50\n")
ROSE = ("Sat: Script `hapki_cara_fit` now returning 0\n"
        "Sat: VRRP_Script(hapki_cara_fit) succeeded\n"
        "Sat: (hapki_cara) Changing effective priority from 50 to 150\n")


def test_a_started_keepalived_runs_at_its_configured_priority() -> None:
    assert effective_priority(START + "Sat: (hapki_cara) Entering BACKUP STATE (init)\n", 150) == 150


def test_a_failed_track_script_lowers_it_until_the_script_rises() -> None:
    assert effective_priority(START + FAILED, 150) == 50
    assert effective_priority(START + FAILED + ROSE, 150) == 150
    assert effective_priority(START + FAILED + ROSE + FAILED, 150) == 50


def test_only_the_last_start_counts() -> None:
    # The lab appends to the log across restarts: a failure before the last start says nothing about now.
    assert effective_priority(START + FAILED + START, 150) == 150
    assert effective_priority(START + ROSE + START + FAILED, 150) == 50


def test_a_log_without_a_start_gives_no_priority() -> None:
    assert effective_priority("", 150) is None
    assert effective_priority(FAILED, 150) is None


def test_the_log_is_read_back_to_its_last_start_only(tmp_path: Path) -> None:
    log = tmp_path / "keepalived.log"
    garp = "Sat: Sending gratuitous ARP on eth0 for 10.213.2.100\n"
    log.write_text(START + FAILED + START + FAILED + garp * 3000)  # the last start is more than a chunk back
    tail = since_last_start(log, chunk=4096)
    assert tail.startswith("Starting Keepalived v2.2.7") and tail.count("Starting") == 1
    assert effective_priority(tail, 150) == 50
    log.write_text(START + FAILED + ROSE)
    assert effective_priority(since_last_start(log, chunk=16), 150) == 150  # a start line split across chunks
    assert since_last_start(tmp_path / "missing.log") == ""
