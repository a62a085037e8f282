"""CPU and wake-ups of every process of the HA lab over a window: what the lab costs while idle (or under a load
you run meanwhile).

    .venv/bin/python scripts/lab_wakeups.py --seconds 15 [--per-second-of RATE]

Per process (all its threads): CPU as a percentage of one core (utime + stime from /proc/<pid>/task/*/stat) and
voluntary context switches per second (`voluntary_ctxt_switches`: the times it went to sleep, so about the times
it woke). With --per-second-of RATE (the issuances per second of a load running meanwhile) CPU is also given in
ms per issuance. On this project's 2-vCPU microVM a wake-up of an idle Python process costs a few hundred
microseconds of CPU (docs/PERFORMANCE.md, session 14).
"""

from __future__ import annotations

import argparse
import os
import re
import time

_PATTERNS = (
    re.compile(r"serve (\w+) --config \S+/(\S+)\.toml"),  # cara:cara-1, clm:clm-2, watcher:watcher-cara-1
    re.compile(r"(nats-server)\b.*/(nats-\d+)/"),
    re.compile(r"(mariadbd)\b.*/(db-\d+)/"),
    re.compile(r"(haproxy)\b.*/lab/([^/]+)/"),
    re.compile(r"(keepalived)\b.*/lab/([^/]+)/"),
    re.compile(r"(prometheus)\b"),
)
TICKS = os.sysconf("SC_CLK_TCK")


def name_of(cmdline: str) -> str | None:
    """`kind:member` of a lab process from its command line; None for anything else."""
    for pattern in _PATTERNS:
        if match := pattern.search(cmdline):
            return ":".join(g for g in match.groups() if g)
    return None


def _sample() -> dict[str, tuple[int, int]]:
    """name -> (CPU ticks, voluntary context switches), summed over the process's threads."""
    totals: dict[str, tuple[int, int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                name = name_of(fh.read().replace(b"\0", b" ").decode(errors="replace"))
            if name is None:
                continue
            ticks = switches = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    switches += sum(int(line.split()[1]) for line in fh if line.startswith("voluntary_ctxt_switches"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        ticks_before, switches_before = totals.get(name, (0, 0))
        totals[name] = (ticks_before + ticks, switches_before + switches)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="window length")
    parser.add_argument("--per-second-of", type=float, default=None, metavar="RATE",
                        help="issuances per second of a load running meanwhile: adds CPU ms per issuance")
    args = parser.parse_args()
    before, started = _sample(), time.monotonic()
    time.sleep(args.seconds)
    after, elapsed = _sample(), time.monotonic() - started
    rows = []
    for name, (ticks, switches) in after.items():
        ticks0, switches0 = before.get(name, (0, 0))
        rows.append((name, (ticks - ticks0) / TICKS / elapsed, (switches - switches0) / elapsed))
    rows.sort(key=lambda row: -row[1])
    per = f"{'ms/issuance':>12}" if args.per_second_of else ""
    print(f"{'process':<26} {'CPU':>7} {'wake-ups/s':>11}{per}")
    for name, cores, wakeups in [*rows, ("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]:
        extra = f"{1000 * cores / args.per_second_of:>12.2f}" if args.per_second_of else ""
        print(f"{name:<26} {100 * cores:>6.2f}% {wakeups:>11.1f}{extra}")


if __name__ == "__main__":
    main()
