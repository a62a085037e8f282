"""The process supervisor of `hapki serve --supervise`: real forks and signals, in a supervisor process of its own
(the test process has threads, and a supervisor must fork from a single-threaded one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hapki.runtime.supervise import STARTS_ENV, RestartBudget, describe, start_count

# argv: mode, a file each child appends its pid to. Modes: crash-twice (SIGKILL itself in its first two lives,
# then exit 0), fail (exit 3 every time), wait (sleep until signalled), graceful (exit 0 on SIGTERM), stubborn
# (ignores SIGTERM).
DRIVER = """
import logging, os, signal, sys, time
from pathlib import Path
from hapki.runtime.supervise import RestartBudget, Supervisor, start_count

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
mode, starts = sys.argv[1], Path(sys.argv[2])

def run():
    # Signal handlers first: the test signals the child as soon as its pid is in `starts` (a handler installed after
    # the write lost that race once under CI's load: SIGTERM's default killed the graceful child).
    if mode == "graceful":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with starts.open("a") as out:
        out.write(f"{os.getpid()}\\n")
    with starts.with_name("counts").open("a") as out:  # which start the child was told it is
        out.write(f"{start_count()}\\n")
    lives = len(starts.read_text().split())
    if mode == "crash-twice":
        if lives <= 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0
    if mode == "fail":
        return 3
    while True:
        time.sleep(1)

budget = RestartBudget(limit=2, window=60.0, delays=(0.0, 0.05))
sys.exit(Supervisor("test service", run, budget).run())
"""


def _supervisor(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    starts = tmp_path / "starts"
    proc = subprocess.Popen([sys.executable, str(driver), mode, str(starts)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, starts


def _pids(starts: Path) -> list[int]:
    return [int(p) for p in starts.read_text().split()] if starts.exists() else []


def _wait_started(starts: Path, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 20
    while not _pids(starts):
        assert proc.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    return _pids(starts)[-1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_child_killed_by_a_signal_is_forked_again(tmp_path: Path) -> None:
    proc, starts = _supervisor(tmp_path, "crash-twice")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out  # the third child exited 0: the supervisor with it
    pids = _pids(starts)
    assert len(pids) == 3 and len(set(pids)) == 3 and proc.pid not in pids, pids
    assert out.count("was killed by SIGKILL; starting it again") == 2, out
    assert (tmp_path / "counts").read_text().split() == ["1", "2", "3"]  # hapki_process_starts of each child
    assert "exited with status 0; the supervisor exits too" in out, out


def test_a_crash_loop_exhausts_the_budget_and_the_supervisor_exits_1(tmp_path: Path) -> None:
    proc, starts = _supervisor(tmp_path, "fail")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert len(_pids(starts)) == 3, out  # the first start and two restarts (limit=2)
    assert "exited with status 3: 2 restarts within 60 s, each after less than 5 s, giving up" in out, out


@pytest.mark.parametrize(("mode", "code"), [("wait", 128 + signal.SIGTERM), ("graceful", 0)])
def test_sigterm_is_passed_on_and_is_not_a_crash(tmp_path: Path, mode: str, code: int) -> None:
    proc, starts = _supervisor(tmp_path, mode)
    child = _wait_started(starts, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    assert _pids(starts) == [child], out  # not started again
    assert "after SIGTERM" in out and "starting it again" not in out, out


def test_the_child_dies_with_its_supervisor_even_if_it_ignores_sigterm(tmp_path: Path) -> None:
    """A killed supervisor is a crashed service: its child gets SIGKILL, so nothing lingers holding its ports."""
    proc, starts = _supervisor(tmp_path, "stubborn")
    child = _wait_started(starts, proc)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gone(child), f"child {child} outlived its SIGKILLed supervisor"


def test_the_budget_grows_the_delays_and_forgets_old_restarts() -> None:
    budget = RestartBudget(limit=3, window=10.0, delays=(0.0, 0.5, 1.0))
    assert [budget.next_delay(t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.5, 1.0]
    assert budget.next_delay(3.0) is None  # three restarts within 10 s
    assert budget.next_delay(10.5) == 1.0  # the one at 0.0 left the window; two remain in it


def test_a_child_that_lived_long_is_restarted_at_once_and_resets_the_count() -> None:
    budget = RestartBudget(limit=2, window=60.0, delays=(0.0, 0.5), stable=5.0)
    assert [budget.next_delay(t, lived=1.0) for t in (0.0, 1.0)] == [0.0, 0.5]  # a loop: backing off
    assert budget.next_delay(2.0, lived=1.0) is None  # and giving up
    budget = RestartBudget(limit=2, window=60.0, delays=(0.0, 0.5), stable=5.0)
    # Crashes 8 s apart, each after 8 s of service: never a loop, always at once.
    assert [budget.next_delay(t, lived=8.0) for t in (8.0, 16.0, 24.0, 32.0)] == [0.0] * 4


def test_describe_names_the_signal_or_the_status() -> None:
    assert describe(signal.SIGKILL) == "was killed by SIGKILL"  # a wait status: the signal in the low bits
    assert describe(3 << 8) == "exited with status 3"


@pytest.mark.parametrize(("value", "count"), [(None, 1), ("3", 3), ("0", 1), ("x", 1), ("-2", 1)])
def test_the_start_count_is_1_without_a_supervisor_or_a_sane_value(monkeypatch: pytest.MonkeyPatch,
                                                                  value: str | None, count: int) -> None:
    if value is None:
        monkeypatch.delenv(STARTS_ENV, raising=False)
    else:
        monkeypatch.setenv(STARTS_ENV, value)
    assert start_count() == count
