"""What the members' keepalived logs say: the VRRP priority each runs with now, and why a VIP is where it is.

keepalived (run by the lab with `-l -D`: its log on stdout, into `<member>/keepalived.log`, appended across
restarts) logs every change of a member's effective priority, e.g. when its track script fails
("Changing effective priority from 150 to 50") or rises again. A member runs with its configured priority
until the first such line after its last start.

Why the lab needs this: at a cold start both CARA members' track scripts fail until their services answer, so
the preferred member holds the VIP at its reduced priority (150 - 100 = 50) while its peer sits at 1. Whichever
script rises first wins: when the peer's rises first (100 > 50) it takes the VIP, and the preferred member takes
it back a second later. A lab that calls itself steady before both have risen can see the VIP move under its
first load (measured: one in four fresh labs, `docs/RELIABILITY.md`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["effective_priority", "log_path", "since_last_start", "vrrp_story"]

_STARTED = "Starting Keepalived"
_CHANGED = re.compile(r"Changing effective priority from \d+ to (\d+)")
# What keepalived logs when a member's VRRP role or priority changes (and why: its track script).
_EVENTS = ("STATE", "Script", "priority", "VIPs")


def log_path(base_dir: Path, member: str) -> Path:
    """Where the lab writes ``member``'s keepalived log."""
    return Path(base_dir) / member / "keepalived.log"


def since_last_start(path: Path, chunk: int = 65536) -> str:
    """A keepalived log from its last "Starting Keepalived" on, read backwards a chunk at a time (a lab that runs for
    days logs a gratuitous ARP refresh every few seconds); "" if the file does not exist."""
    pattern = _STARTED.encode()
    try:
        with open(path, "rb") as f:
            start = f.seek(0, 2)
            tail = b""
            while start > 0:
                size = min(chunk, start)
                start -= size
                f.seek(start)
                tail = f.read(size) + tail
                at = tail.rfind(pattern, 0, size + len(pattern))  # the new chunk, and a match across its end
                if at >= 0:
                    return tail[at:].decode(errors="replace")
            return tail.decode(errors="replace")
    except FileNotFoundError:
        return ""


def effective_priority(log_text: str, configured: int) -> int | None:
    """The priority keepalived runs with, from its log: ``configured`` unless a track script changed it since
    keepalived last started. None: the log shows no start (keepalived never ran, or it logs elsewhere)."""
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if _STARTED in line]
    if not starts:
        return None
    priority = configured
    for line in lines[starts[-1]:]:
        changed = _CHANGED.search(line)
        if changed:
            priority = int(changed.group(1))
    return priority


def vrrp_story(lab: Any, tier: str, lines: int = 8) -> str:
    """The last VRRP state changes, priority changes and track-script results in the keepalived logs of `tier`'s
    members: why a VIP was where it was."""
    story: list[str] = []
    for member in lab.topo.members_of_tier(tier):
        path = log_path(lab.base_dir, member)
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            story.append(f"{member}: {exc}")
            continue
        story += [f"{member}: {line}" for line in [t for t in text if any(k in t for k in _EVENTS)][-lines:]]
    return "\n".join(story)
