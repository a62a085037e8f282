"""What a process costs, from /proc: CPU seconds (utime + stime, its descendants included) and peak RSS (VmHWM).

`ProcessGroups` names groups of PIDs (`clm`, `cara`, `mariadbd`, ...; a group can hold several processes, e.g. the
two CARA members of the HA lab) and measures a window: CPU seconds each group used between `start()` and
`stop()`, and each group's peak RSS per process. Descendants count with their parent (a service that starts
signer processes is charged for them), found when the window starts and when it ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of one process so far (from /proc/<pid>/stat), None if it is gone."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return _cpu_of(stat)


def _cpu_of(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()  # fields after the command name; utime, stime are the 12th, 13th
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy so far (from /proc/stat), whoever used it."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def peak_rss_mib(pid: int | None) -> float | None:
    """Peak resident set size (VmHWM) of a process in MiB, None if it is gone."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int | None) -> float | None:
    """Resident set size now (VmRSS) of a process in MiB, None if it is gone."""
    return _status_mib(pid, "VmRSS")


def _status_mib(pid: int | None, field: str) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process on the host now."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def with_descendants(pids: Iterable[int]) -> list[int]:
    """`pids` and every process below them."""
    tree, seen, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(tree.get(pid, []))
    return seen


class ProcessGroups:
    """CPU seconds and peak RSS of named groups of processes over a measured window (see the module docstring)."""

    def __init__(self, groups: Mapping[str, Iterable[int | None]], *, alone: Iterable[str] = ()) -> None:
        """`alone`: groups whose processes count without their descendants (a load generator that also happens
        to be the parent of the services it measures)."""
        self.groups = {name: [p for p in pids if p] for name, pids in groups.items()}
        self._alone = set(alone)
        self._before: dict[str, dict[int, float]] = {}

    def _members(self, name: str) -> list[int]:
        return self.groups[name] if name in self._alone else with_descendants(self.groups[name])

    def _sample(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name in self.groups:
            out[name] = {}
            for pid in self._members(name):
                seconds = cpu_seconds(pid)
                if seconds is not None:
                    out[name][pid] = seconds
        return out

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since start(); a process born in the window counts from zero."""
        after = self._sample()
        return {name: round(sum(t - self._before.get(name, {}).get(pid, 0.0) for pid, t in now.items()), 3)
                for name, now in after.items()}

    def peak_rss_mib(self) -> dict[str, float | None]:
        """Largest VmHWM of one process (descendants included) per group, MiB: the per-process memory figure."""
        out: dict[str, float | None] = {}
        for name in self.groups:
            values = [v for v in (peak_rss_mib(p) for p in self._members(name)) if v is not None]
            out[name] = round(max(values), 1) if values else None
        return out


def per_issuance_ms(cpu: Mapping[str, float], issued: int) -> dict[str, float | None]:
    """CPU milliseconds per issued certificate by group (None when nothing was issued)."""
    return {name: (round(1000 * seconds / issued, 3) if issued else None) for name, seconds in cpu.items()}
