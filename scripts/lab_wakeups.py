"""CPU and wake-ups of every process of the HA lab over a window: what the lab costs while idle (or under a load
you run meanwhile).

    .venv/bin/python scripts/lab_wakeups.py --seconds 15 [--per-second-of RATE] [--dir .run/lab]

Per process of the lab's process table (`kind@member`, all its threads and its live descendants): CPU as a percentage of one core
(hapki.cli.procstat) and voluntary context switches per second (`voluntary_ctxt_switches` of each thread: the
times it went to sleep, so about the times it woke). With --per-second-of RATE (the issuances per second of a load
running meanwhile) CPU is also given in ms per issuance. On this project's 2-vCPU microVM a wake-up of an idle
Python process costs a few hundred microseconds of CPU (docs/PERFORMANCE-HISTORY.md, session 14).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hapki.cli.procstat import cpu_seconds, with_descendants
from hapki.lab.ha import DEFAULT_DIR, Lab


def voluntary_switches(pid: int) -> int:
    """Voluntary context switches of all threads of `pid` so far (0 if it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                total += sum(int(line.split()[1]) for line in fh if line.startswith("voluntary_ctxt_switches"))
        except OSError:
            continue  # the thread ended meanwhile
    return total


def with_children(processes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Each name's PIDs and every live process below them. A lab service runs as the child of its supervisor
    (`hapki serve --supervise`, session 19), its signer workers below that: /proc counts a child's CPU in its
    parent's only once it is reaped, so without them the services read 0.00% (as they did since session 19)."""
    return {name: with_descendants(pids) for name, pids in processes.items()}


def sample(processes: Mapping[str, Sequence[int]]) -> dict[str, tuple[float, int]]:
    """name -> (CPU seconds, voluntary context switches) so far, summed over the name's live PIDs."""
    return {name: (sum(cpu_seconds(pid) or 0.0 for pid in pids), sum(voluntary_switches(pid) for pid in pids))
            for name, pids in processes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="window length")
    parser.add_argument("--per-second-of", type=float, default=None, metavar="RATE",
                        help="issuances per second of a load running meanwhile: adds CPU ms per issuance")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the lab's directory")
    args = parser.parse_args()
    procs = Lab(args.dir).procs
    processes = with_children({name: procs.pids(name) for name in procs.names()})
    before, started = sample(processes), time.monotonic()
    time.sleep(args.seconds)
    after, elapsed = sample(processes), time.monotonic() - started
    rows = sorted(((name, (cpu - before[name][0]) / elapsed, (switches - before[name][1]) / elapsed)
                   for name, (cpu, switches) in after.items()), key=lambda row: -row[1])
    per = f"{'ms/issuance':>12}" if args.per_second_of else ""
    print(f"{'process':<26} {'CPU':>7} {'wake-ups/s':>11}{per}")
    for name, cores, wakeups in [*rows, ("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]:
        extra = f"{1000 * cores / args.per_second_of:>12.2f}" if args.per_second_of else ""
        print(f"{name:<26} {100 * cores:>6.2f}% {wakeups:>11.1f}{extra}")


if __name__ == "__main__":
    main()
