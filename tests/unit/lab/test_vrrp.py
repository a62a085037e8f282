"""A member's effective VRRP priority, read from its keepalived log (hapki.lab.vrrp)."""

from __future__ import annotations

from hapki.lab.vrrp import effective_priority

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
