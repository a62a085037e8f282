"""The HA lab's processes, tracked by PID in a JSON state file, so any process (another `hapki lab` command, a
test, the fault suite) can inspect, stop, crash and restart them by name.

A name is `<kind>@<member>`: `keepalived@cara-1`, `haproxy@clm-2`, `cara@cara-1`, `clm@clm-1`, `watcher@cara-2`,
`galera@db-1`, `nats@nats-3`. Each entry keeps the argv it was started with (so it can be started again), its log,
extra pid files (keepalived's VRRP child) and a *marker*: a path that must appear on the process's command line
before we signal it, so a PID the kernel reused for something else is never touched.

Processes are spawned through hapki.lab.local (own session, output appended to a log, killed by an atexit hook
if this interpreter exits without stopping them). A command that must outlive its process, like `hapki lab up`,
calls `detach()` so its exit leaves the lab running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hapki.lab import local

__all__ = ["ProcessTable", "Tracked", "wait_until"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> float | None:
    """Poll ``predicate`` until it is truthy; return the seconds it took, or None after ``timeout``."""
    began = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            return None
        time.sleep(interval)


@dataclass
class Tracked:
    """One process of the lab as recorded in the state file."""

    name: str
    member: str
    kind: str
    pid: int
    marker: str
    argv: list[str]
    log: str
    env: dict[str, str] | None = None
    pid_files: list[str] = field(default_factory=list)  # further processes of this one (keepalived's child)
    # Removed before a restart: keepalived refuses to start while its pid files name a process that exists, and
    # a SIGKILLed keepalived stays a zombie until PID 1 reaps it, which may take seconds.
    stale_files: list[str] = field(default_factory=list)
    started_at: float = 0.0  # time.time()


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` with spaces for NULs (empty if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ProcessTable:
    """The state file (`state.json`) and the processes it names."""

    def __init__(self, state_path: Path) -> None:
        self.path = Path(state_path)
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # the ones this interpreter spawned
        self.meta: dict[str, Any] = {}
        self.procs: dict[str, Tracked] = {}
        self.load()

    # --- the file -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file (missing or unreadable: empty)."""
        with self._lock:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            self.meta = dict(data.get("meta", {}))
            self.procs = {p["name"]: Tracked(**p) for p in data.get("processes", [])}

    def save(self) -> None:
        """Write the state file atomically."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = {"version": STATE_VERSION, "meta": self.meta, "processes": [asdict(p) for p in self.procs.values()]}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=str))
            tmp.replace(self.path)

    def set_meta(self, **values: Any) -> None:
        with self._lock:
            self.meta.update(values)
            self.save()

    def clear(self) -> None:
        with self._lock:
            self.procs.clear()
            self.meta.clear()
            self.path.unlink(missing_ok=True)

    # --- starting -------------------------------------------------------------------------------------------

    def launch(self, name: str, argv: Sequence[str], log_path: Path, *, marker: str,
               env: Mapping[str, str] | None = None, pid_files: Iterable[Path] = (),
               stale_files: Iterable[Path] = ()) -> Tracked:
        """Spawn ``argv`` (output appended to ``log_path``) and record it as ``name`` (`<kind>@<member>`).

        ``stale_files`` are removed first (here and at every relaunch).
        """
        kind, _, member = name.partition("@")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_files:
            Path(stale).unlink(missing_ok=True)
        child = local._spawn(argv, log_path, env)
        entry = Tracked(name=name, member=member, kind=kind, pid=child.pid, marker=marker, argv=list(argv),
                        log=str(log_path), env=None if env is None else dict(env),
                        pid_files=[str(p) for p in pid_files], stale_files=[str(p) for p in stale_files],
                        started_at=time.time())
        with self._lock:
            self._children[child.pid] = child
            self.procs[name] = entry
            self.save()
        return entry

    def relaunch(self, name: str) -> Tracked:
        """Start ``name`` again with its recorded argv (it must be stopped; stale pid files are removed)."""
        old = self.procs[name]
        if self.alive(name):
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        return self.launch(name, old.argv, Path(old.log), marker=old.marker, env=old.env,
                           pid_files=[Path(p) for p in old.pid_files], stale_files=[Path(p) for p in old.stale_files])

    def record(self, name: str, pid: int, marker: str, log_path: Path) -> None:
        """Record a process started by someone else (the data tier's own starters)."""
        kind, _, member = name.partition("@")
        with self._lock:
            self.procs[name] = Tracked(name=name, member=member, kind=kind, pid=pid, marker=marker,
                                       argv=[], log=str(log_path), started_at=time.time())
            self.save()

    def detach(self) -> None:
        """Let the lab outlive this interpreter: drop our processes from hapki.lab.local's atexit kill list."""
        with local._live_lock:
            for entry in self.procs.values():
                local._live.pop(entry.pid, None)

    # --- looking --------------------------------------------------------------------------------------------

    def _ours(self, pid: int, marker: str) -> bool:
        return pid > 0 and local._pid_running(pid) and marker in _cmdline(pid)

    def pids(self, name: str) -> list[int]:
        """Live PIDs of ``name``: its own and those in its pid files, each checked against its marker."""
        entry = self.procs.get(name)
        if entry is None:
            return []
        self._reap(entry.pid)
        candidates = [entry.pid]
        for pid_file in entry.pid_files:
            try:
                candidates.append(int(Path(pid_file).read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return [pid for pid in dict.fromkeys(candidates) if self._ours(pid, entry.marker)]

    def alive(self, name: str) -> bool:
        return bool(self.pids(name))

    def exited(self, name: str, grace: float = 0.3) -> bool:
        """Whether ``name``, just started, is gone: not alive, and still not after ``grace`` seconds. Right after its
        exec a process can show an empty command line for a moment (the kernel sets it while loading the program,
        after the exec already answered our Popen), so the marker check alone calls a starting process dead."""
        return not self.alive(name) and wait_until(lambda: self.alive(name), grace, 0.05) is None

    def pid(self, name: str) -> int | None:
        """The main PID of ``name`` if it runs."""
        entry = self.procs.get(name)
        return entry.pid if entry is not None and self._ours(entry.pid, entry.marker) else None

    def names(self, kind: str | None = None, member: str | None = None) -> list[str]:
        return [n for n, p in self.procs.items()
                if (kind is None or p.kind == kind) and (member is None or p.member == member)]

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            self._children.pop(pid, None)
            with local._live_lock:
                local._live.pop(pid, None)

    # --- stopping -------------------------------------------------------------------------------------------

    def _wait_gone(self, name: str, pids: Sequence[int], timeout: float) -> bool:
        entry = self.procs[name]

        def gone() -> bool:
            self._reap(entry.pid)
            return not any(self._ours(p, entry.marker) for p in pids)

        return wait_until(gone, timeout, 0.01) is not None

    def _signal(self, pids: Iterable[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """Graceful: SIGTERM the main process, wait for it and its pid-file processes; SIGKILL after ``timeout``."""
        pids = self.pids(name)
        if not pids:
            return
        self._signal(pids[:1], signal.SIGTERM)
        if not self._wait_gone(name, pids, timeout):
            log.warning("%s ignored SIGTERM for %.0f s; killing it", name, timeout)
            self._kill_tree(name)
            self._wait_gone(name, pids, 5.0)

    def _kill_tree(self, name: str) -> None:
        """SIGKILL ``name`` and every process below it (a supervised service's child, a CARA's signer workers)."""
        from hapki.cli.procstat import with_descendants

        self._signal(with_descendants(self.pids(name)), signal.SIGKILL)

    def crash(self, name: str) -> None:
        """A true crash: SIGSTOP every process of ``name`` and below it (a CARA's signer workers) first (no parent
        can react), then SIGKILL them all."""
        from hapki.cli.procstat import with_descendants

        pids = with_descendants(self.pids(name))
        self._signal(pids, signal.SIGSTOP)
        self._signal(pids, signal.SIGKILL)
        self._wait_gone(name, pids, 5.0)

    def stop_many(self, names: Sequence[str], timeout: float = 15.0) -> None:
        """Stop several processes at once (SIGTERM all, then wait)."""
        live = {n: self.pids(n) for n in names}
        for pids in live.values():
            self._signal(pids[:1], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, pids in live.items():
            if pids and not self._wait_gone(name, pids, max(0.0, deadline - time.monotonic())):
                log.warning("%s ignored SIGTERM; killing it", name)
                self._kill_tree(name)
                self._wait_gone(name, pids, 5.0)
