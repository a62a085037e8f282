"""The process supervisor of `hapki serve --supervise`: the service runs in a forked child, started again at once
when it dies without being asked to.

Why: a process that dies unasked (a PKCS#11 library that segfaults, the OOM killer, a fail point) is restarted
by systemd in production, but a new Python process spends most of its start importing (0.5-0.8 s of the ~0.8-1.0 s
a CARA member took to sign again in `hapki chaos --scenario signer-crash`). The supervisor imports the service's
modules once (`preload`), then forks: a child starts from a warm interpreter and only opens its connections and
HSM sessions. This is gunicorn's preload-and-fork model; the supervisor itself opens nothing (no socket, no
thread, no event loop, no HSM session) and so stays simple enough not to crash.

- A child that exits with status 0 ends the supervisor with 0 (the service chose to stop).
- SIGTERM and SIGINT are passed on to the child; the supervisor then waits for it and exits with its status.
- A child that dies otherwise (a signal, a non-zero status) is forked again at once. Only children that die young
  (within STABLE_SECONDS of their start: a crash loop, e.g. a broken HSM or config) are restarted after growing
  delays (RESTART_DELAYS); after RESTART_LIMIT such restarts within RESTART_WINDOW_SECONDS the supervisor gives
  up and exits 1, so systemd's own policy (and keepalived's track script, which moves the VIP once the member's
  health check fails) takes over. A child that ran longer resets the count: its crash is not a loop.
- The child dies with the supervisor (PR_SET_PDEATHSIG: SIGKILL), so a killed supervisor is a crashed service:
  no orphan keeps signing or holds the service's ports against the next start. (A stop goes through SIGTERM,
  passed on above, so the child hands back what it fetched.)
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("hapki.supervise")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 60.0
RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)  # before the 1st, 2nd, ... restart within the window
STABLE_SECONDS = 5.0  # a child that lived this long did not die of a crash loop
STARTS_ENV = "HAPKI_SUPERVISED_STARTS"  # set in each child: which start it is (1, 2, ...)
_FORWARDED = (signal.SIGTERM, signal.SIGINT)


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent dies (a crash too), so no orphan keeps signing;
    exit now if the parent died before the prctl took effect."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody would signal us
        raise SystemExit(f"{sys.argv[0]}: parent {parent_pid} is gone")


def start_count() -> int:
    """Which start of this service process this is under its supervisor (1 without one): the
    `hapki_process_starts` gauge, so a dashboard shows restarts after crashes."""
    value = os.environ.get(STARTS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def describe(status: int) -> str:
    """A wait status in words: "was killed by SIGKILL", "exited with status 3"."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


@dataclass
class RestartBudget:
    """How soon to restart a child that died after living `lived` seconds: at once after a stable life, else after
    growing delays; None once `limit` restarts of short-lived children fell within `window` seconds."""

    limit: int = RESTART_LIMIT
    window: float = RESTART_WINDOW_SECONDS
    delays: tuple[float, ...] = RESTART_DELAYS
    stable: float = STABLE_SECONDS
    _recent: deque[float] = field(default_factory=deque)

    def next_delay(self, now: float, lived: float = 0.0) -> float | None:
        if lived >= self.stable:
            self._recent.clear()
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) >= self.limit:
            return None
        delay = self.delays[min(len(self._recent), len(self.delays) - 1)]
        self._recent.append(now)
        return delay


class Supervisor:
    """Runs `run` (returns an exit status) in forked children; see the module docstring."""

    def __init__(self, name: str, run: Callable[[], int], budget: RestartBudget | None = None) -> None:
        self.name, self._run = name, run
        self.budget = budget or RestartBudget()
        self.child = 0
        self.starts = 0
        self._stopping: int | None = None  # the signal that asked us to stop

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = signum
        if self.child:
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        if threading.active_count() != 1:  # a thread would not exist in the children (and could hold a lock)
            raise RuntimeError(f"the supervisor of {self.name} must fork from a single-threaded process")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _FORWARDED}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        while True:
            self.child, started = self._fork(), time.monotonic()
            if self._stopping is not None:  # asked to stop while we forked: pass it on now
                os.kill(self.child, self._stopping)
            _, status = os.waitpid(self.child, 0)  # retried after our signal handler runs (PEP 475)
            pid, self.child = self.child, 0
            code = os.waitstatus_to_exitcode(status)
            if self._stopping is not None:
                log.info("%s (pid %d) %s after %s", self.name, pid, describe(status),
                         signal.Signals(self._stopping).name)
                return code if code >= 0 else 128 - code
            if code == 0:
                log.info("%s (pid %d) exited with status 0; the supervisor exits too", self.name, pid)
                return 0
            now = time.monotonic()
            delay = self.budget.next_delay(now, lived=now - started)
            if delay is None:
                log.error("%s (pid %d) %s: %d restarts within %.0f s, each after less than %.0f s, giving up",
                          self.name, pid, describe(status), self.budget.limit, self.budget.window,
                          self.budget.stable)
                return 1
            log.error("%s (pid %d) %s; starting it again in %.1f s", self.name, pid, describe(status), delay)
            deadline = time.monotonic() + delay
            while self._stopping is None and time.monotonic() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if self._stopping is not None:
                return 0

    def _fork(self) -> int:
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # what was imported stays out of the child's collections, so they do not copy its pages
        pid = os.fork()
        if pid:
            self.starts += 1
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            return pid
        # The child: default signal handling (the service installs its own), then the service; never returns.
        code = 1
        try:
            for sig in _FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            die_with_parent(parent, signal.SIGKILL)  # a killed supervisor is a crashed service, nothing lingers
            os.environ[STARTS_ENV] = str(self.starts + 1)
            code = self._run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException:  # the child's last word: log it, as an uncaught exception would print it
            log.exception("%s failed", self.name)
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
