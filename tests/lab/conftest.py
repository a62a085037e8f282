"""The HA lab for tests: one lab per session (`hapki.lab.ha.Lab`), healed after every test.

Tests that break things (stop keepalived, block VRRP, cut a link) leave the repair to the `lab` fixture: after
each test every fault rule is removed, every link is up, every process that `up()` started runs again and each
VIP is back on its preferred member. A test that takes the whole lab down (test_lab_down.py) runs last; the
fixture brings the lab up again should another test follow it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
from hapki.lab.ha import Lab, LabBusy

TOOLS = ("ip", "nft", "keepalived", "haproxy", "mariadbd", "curl", "softhsm2-util", "rsync", "prometheus")
HEAL_VIP_TIMEOUT = 30.0  # VIPs home and every track script risen (a restarted member: its service, then 2 s)
# Timings measured by the tests (seconds); printed at the end of the session (`pytest -s` or the summary).
TIMINGS: dict[str, list[float]] = {}


def why_no_lab() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the HA lab needs root (network namespaces, veth, nftables, keepalived)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the HA lab needs {', '.join(missing)}"
    probe = f"hapki-test-probe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` does not work here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=False, capture_output=True)
    return None


def record_timing(name: str, seconds: float) -> None:
    TIMINGS.setdefault(name, []).append(round(seconds, 3))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The test that takes the lab down runs after every other lab test (it would cost a second `up` otherwise);
    # `hapki lab demo` brings its own lab up and down, so it runs last, when the session's lab is down.
    items.sort(key=lambda item: 2 if "test_lab_demo" in item.nodeid else 1 if "test_lab_down" in item.nodeid else 0)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("HA lab timings (s)")
        for name, values in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {values}")


@pytest.fixture(scope="session")
def namespaces_work() -> None:
    """For a test that makes network namespaces of its own (no lab): skipped only where the lab could not run."""
    reason = why_no_lab()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = why_no_lab()
    if reason:
        pytest.skip(reason)
    the_lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        timings = the_lab.up()
    except LabBusy as exc:  # one lab per host: someone else's lab (another session) is up
        pytest.skip(str(exc))
    for step, seconds in timings.items():
        record_timing(f"up.{step}", seconds)
    try:
        yield the_lab
    finally:
        the_lab.down()


def heal(lab: Lab) -> None:
    """Undo every fault a test may have left (hapki.lab.ha.Lab.heal): blocks, cut links, dead HSMs and data
    nodes, stopped processes, fail points; VIPs back home."""
    lab.heal(vip_timeout=HEAL_VIP_TIMEOUT)


@pytest.fixture
def timing() -> Callable[[str, float], None]:
    """Record a measured time (seconds) under a name; all are printed at the end of the session."""
    return record_timing


@pytest.fixture
def lab(lab_session: Lab) -> Iterator[Lab]:
    """The running lab, healthy at the start of the test and healed after it."""
    lab_session.procs.load()
    if lab_session.procs.meta.get("state") != "up":
        lab_session.up()
    yield lab_session
    lab_session.procs.load()  # another process (`hapki lab down`) may have changed it
    if lab_session.procs.meta.get("state") == "up":
        heal(lab_session)
