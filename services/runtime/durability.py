"""What every database node must be set to for a commit the services acted on to survive the whole site losing
power at once (`hapki db check` reads it from each node).

Galera makes a commit survive the loss of any node: it is certified by all before it returns. It does not make it
survive the loss of all of them together, which is what a power cut of a one-site cluster is. A node whose InnoDB
flushes its log once a second (innodb_flush_log_at_trx_commit 2 or 0, Galera's usual advice) keeps the last
second of commits only in the kernel's memory, and so does every other node: after the cut the cluster comes back
(Lab.restart_site, pc.recovery) without them. For a CA those are requests already accepted, serials reserved
before `C_Sign` (the signature was made: invariants 3 and 4) and certificates already handed out. So hapki asks
for 1: the node's log is on its disk before the commit returns (measured in docs/RELIABILITY.md, "The whole
site"). With the binary log on, it must be synced as well, or recovery rolls back what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hapki.contracts.errors import DatabaseError
from hapki.runtime.db import Database

__all__ = ["REQUIRED", "NodeDurability", "read_nodes"]

# variable -> (value required, why)
REQUIRED: dict[str, tuple[str, str]] = {
    "innodb_flush_log_at_trx_commit": (
        "1", "a commit must be on the node's disk before it returns: with 0 or 2 a power cut of the whole site loses "
             "up to a second of commits on every node (accepted requests, serials reserved before C_Sign, "
             "certificates handed out)"),
    "innodb_doublewrite": ("ON", "InnoDB repairs a page torn by a power cut from its doublewrite copy"),
}
# Checked only when the node writes a binary log (log_bin ON).
BINLOG: dict[str, tuple[str, str]] = {
    "sync_binlog": ("1", "with the binary log on, InnoDB recovery rolls back what the log lacks: it must be synced "
                         "at every commit too"),
}


@dataclass
class NodeDurability:
    node: str
    settings: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str | None = None  # the node did not answer: its settings are unknown, not wrong

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems


async def read_nodes(db: Database) -> list[NodeDurability]:
    """Every configured node's durability settings and what is wrong with them (a node that does not answer is
    reported as such: a node down is the cluster's concern, not a setting)."""
    found = []
    for node in db.nodes:
        report = NodeDurability(node)
        try:
            report.settings = await db.node_variables(node, [*REQUIRED, *BINLOG, "log_bin"])
        except DatabaseError as exc:
            report.error = str(exc)
            found.append(report)
            continue
        wanted = dict(REQUIRED)
        if report.settings.get("log_bin", "OFF").upper() == "ON":
            wanted.update(BINLOG)
        for name, (value, why) in wanted.items():
            actual = report.settings.get(name)
            if actual is None or actual.upper() != value:
                report.problems.append(f"{name} = {actual} (wanted {value}): {why}")
        found.append(report)
    return found
