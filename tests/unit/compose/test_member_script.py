"""compose/images/hapki/member.sh supervises keepalived, haproxy and the service in one container: when any of them
exits, it stops the others and exits non-zero (Docker then restarts the whole member); on SIGTERM it stops all.
Run here with stand-ins for the three programs (the real ones need the container's network)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "compose" / "images" / "hapki" / "member.sh"


def _stubs(tmp_path: Path, service_exit: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pids = tmp_path / "pids"
    stubs = {
        "keepalived": f'echo $$ >> {pids}; exec sleep 30',
        "haproxy": f'case " $* " in *" -c "*) exit 0 ;; esac; echo $$ >> {pids}; exec sleep 30',
        "setpriv": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"',  # drop the options, run the rest
        "hapki": f'echo $$ >> {pids}; {service_exit}',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _alive(tmp_path: Path) -> list[int]:
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()] if (tmp_path / "pids").exists() else []
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def test_a_dying_service_takes_the_member_down(tmp_path: Path) -> None:
    env = _stubs(tmp_path, "sleep 0.5; exit 3")
    began = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), "cara"], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - began < 10
    assert "stopping the member" in result.stderr
    assert len((tmp_path / "pids").read_text().split()) == 3 and _alive(tmp_path) == []


def test_a_clean_exit_still_counts_as_a_failure(tmp_path: Path) -> None:
    env = _stubs(tmp_path, "exit 0")
    result = subprocess.run(["bash", str(SCRIPT), "clm"], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1 and _alive(tmp_path) == []


def test_sigterm_stops_all_three(tmp_path: Path) -> None:
    env = _stubs(tmp_path, "exec sleep 30")
    proc = subprocess.Popen(["bash", str(SCRIPT), "cara"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while len(_alive(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_alive(tmp_path)) == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) != 0
    time.sleep(0.2)
    assert _alive(tmp_path) == []


def test_an_unknown_service_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), "nats"], env=_stubs(tmp_path, "exit 0"), capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 2 and "unknown service" in result.stderr
    assert not (tmp_path / "pids").exists()


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    for pid in _alive(tmp_path):  # only the stand-ins this test started, by their recorded PIDs
        os.kill(pid, signal.SIGKILL)
