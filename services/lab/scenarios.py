"""The fault suite's scenarios: one named single failure each, how to inject it and how to undo it.

A scenario is three functions of the lab and a per-run scratch dict (`ctx`):
- `prepare` (optional, before the load starts; not measured): e.g. restart the signer with a fail point armed;
- `inject` (during the load): cause the failure and return its wall-clock time (`time.time()`) — the moment
  the fault is in effect, from which unavailability and the time to the first signature are measured;
- `restore` (optional, `hold` seconds after the fault, load still running): undo it as operations would
  (restore a link, restart a database node, put an HSM back). Where nothing would come back within a run
  (a crashed host), there is no restore: `Lab.heal()` brings it back after the run, outside the measurement.

Members are chosen at run time: "the active CARA member" is the one holding the CARA VIP when the fault starts;
"the database node the services use" is db-1, the first node of every service's list (a fault there is the
harder case: connections must fail over, not just wait for the cluster to recover).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hapki.lab.cluster import wait_until
from hapki.lab.load import connect_db, crash_member
from hapki.lab.vrrp import vrrp_story

__all__ = ["ALIASES", "SCENARIOS", "Scenario", "signing_stream_leader"]

Step = Callable[[Any, dict[str, Any]], Any]


@dataclass(frozen=True)
class Scenario:
    """One single failure under load; see the module docstring."""

    name: str
    summary: str
    inject: Callable[[Any, dict[str, Any]], float]
    restore: Step | None = None
    prepare: Step | None = None
    hold: float = 3.0  # seconds from the fault to `restore` (load keeps running)
    tail: float = 3.0  # seconds of load after `restore` (or after the fault, without one)
    kind: str = "other"  # cara | clm | db | site | other: which goal of docs/RELIABILITY.md applies


def _active(lab: Any, tier: str) -> str:
    holders = lab.vip_holders(tier)
    if len(holders) != 1:
        raise RuntimeError(f"the {tier} VIP is held by {holders}, not by one member; keepalived:\n"
                           f"{vrrp_story(lab, tier)}")
    return holders[0]


# --- CARA -----------------------------------------------------------------------------------------------------

def _cara_crash(lab: Any, ctx: dict[str, Any]) -> float:
    ctx["member"] = _active(lab, "cara")
    return crash_member(lab, ctx["member"])


def _cara_graceful(lab: Any, ctx: dict[str, Any]) -> float:
    ctx["member"] = member = _active(lab, "cara")
    began = time.time()
    lab.procs.stop_many(lab.procs.names(member=member), timeout=15.0)
    return began


def _cara_link(lab: Any, ctx: dict[str, Any]) -> float:
    ctx["member"] = _active(lab, "cara")
    began = time.time()
    lab.net.cut_link(ctx["member"])
    return began


def _cara_link_restore(lab: Any, ctx: dict[str, Any]) -> None:
    lab.net.restore_link(ctx["member"])


def _split_brain(tier: str) -> tuple[Callable[[Any, dict[str, Any]], float], Step]:
    """Drop VRRP between the members of ``tier``: both become MASTER and hold the VIP; and its undo."""

    def inject(lab: Any, ctx: dict[str, Any]) -> float:
        members = sorted(lab.topo.members_of_tier(tier))
        began = time.time()
        lab.net.block_vrrp(tier)
        ctx["formed"] = wait_until(lambda: sorted(lab.vip_holders(tier)) == members, 5.0, 0.02)
        if ctx["formed"] is None:
            raise RuntimeError(f"split brain did not form within 5 s: {lab.vip_holders(tier)}")
        return began

    def restore(lab: Any, ctx: dict[str, Any]) -> None:
        lab.net.unblock_vrrp(tier)

    return inject, restore


def _signer_prepare(lab: Any, ctx: dict[str, Any]) -> None:
    member = _active(lab, "cara")
    arm = lab.base_dir / "chaos-arm-after-sign"
    arm.unlink(missing_ok=True)
    ctx.update(member=member, name=f"cara@{member}", arm=arm)
    lab.set_fail_points(ctx["name"], "cara.after_sign=crash", arm_file=arm)


def serving_child(lab: Any, name: str) -> int:
    """The PID of the process serving ``name``: the child its supervisor (`hapki serve --supervise`) forked."""
    from hapki.cli.procstat import with_descendants

    parent = lab.procs.pid(name)
    if parent is None:
        raise RuntimeError(f"{name} is not running")
    children = [pid for pid in with_descendants([parent]) if _parent_of(pid) == parent]
    if len(children) != 1:
        raise RuntimeError(f"{name} (pid {parent}) has children {children}, not the one service process")
    return children[0]


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _signer_crash(lab: Any, ctx: dict[str, Any]) -> float:
    child = serving_child(lab, ctx["name"])
    began = time.time()
    ctx["arm"].touch()  # the next signature (any worker) kills the process between C_Sign and its commit
    died = wait_until(lambda: _parent_of(child) is None, 10.0, 0.005)  # gone, and reaped by its supervisor
    ctx["arm"].unlink(missing_ok=True)  # the child forked next starts disarmed
    if died is None:
        raise RuntimeError(f"{ctx['name']}'s process {child} did not reach the armed fail point within 10 s")
    ctx["crashed"] = child
    return began


def _service_kill(tier: str) -> Callable[[Any, dict[str, Any]], float]:
    """SIGKILL the process serving `tier` on its active member (the VM, keepalived and the supervisor live on)."""

    def inject(lab: Any, ctx: dict[str, Any]) -> float:
        ctx["member"] = member = _active(lab, tier)
        child = serving_child(lab, f"{tier}@{member}")
        began = time.time()
        os.kill(child, signal.SIGKILL)
        return began

    return inject


# --- CLM ------------------------------------------------------------------------------------------------------

def _clm_crash(lab: Any, ctx: dict[str, Any]) -> float:
    ctx["member"] = _active(lab, "clm")
    return crash_member(lab, ctx["member"])


# --- database -------------------------------------------------------------------------------------------------

DB_NODE = "db-1"


def _db_kill(lab: Any, ctx: dict[str, Any]) -> float:
    return lab.kill_data_node(f"galera@{DB_NODE}")


def _db_restart(lab: Any, ctx: dict[str, Any]) -> None:
    lab.start_data_node(f"galera@{DB_NODE}")


def _db_cluster_down(lab: Any, ctx: dict[str, Any]) -> float:
    return float(lab.crash_galera_cluster())


def _db_cluster_restart(lab: Any, ctx: dict[str, Any]) -> None:
    lab.restart_galera_nodes([f"galera@{node.name}" for node in lab.galera.nodes], bootstrap_if_stuck=False)


def _db_others(node: str, lab: Any) -> list[str]:
    return [n.name for n in lab.galera.nodes if n.name != node]


def _db_partition(lab: Any, ctx: dict[str, Any]) -> float:
    return _cut(lab, ctx, [(DB_NODE, other) for other in _db_others(DB_NODE, lab)])


def _db_partition_restore(lab: Any, ctx: dict[str, Any]) -> None:
    _uncut(lab, ctx)
    _wait_synced(lab, DB_NODE)


MINORITY_NODE = "db-3"


def _db_minority(lab: Any, ctx: dict[str, Any]) -> float:
    # db-3 alone on its side of a partition: it drops to non-Primary (wsrep_ready=OFF, every statement 1047).
    # The active CARA member loses its paths to db-1 and db-2 (a network fault between it and them), so the only
    # database node it can reach is the non-Primary one. Everyone else keeps the Primary component.
    ctx["member"] = cara = _active(lab, "cara")
    return _cut(lab, ctx, [(MINORITY_NODE, other) for other in _db_others(MINORITY_NODE, lab)]
                + [(cara, other) for other in _db_others(MINORITY_NODE, lab)])


def _db_minority_restore(lab: Any, ctx: dict[str, Any]) -> None:
    _uncut(lab, ctx)
    _wait_synced(lab, MINORITY_NODE)


def _cut(lab: Any, ctx: dict[str, Any], pairs: list[tuple[str, str]]) -> float:
    """Block traffic between each pair of members (kept in ctx for `_uncut`); the time the last rule is in: the
    fault is whole then, and a commit racing the rules is not "after it"."""
    ctx["pairs"] = pairs
    for a, b in pairs:
        lab.net.block(a, b)
    return time.time()


def _uncut(lab: Any, ctx: dict[str, Any]) -> None:
    for a, b in ctx["pairs"]:
        lab.net.unblock(a, b)


def _wait_synced(lab: Any, name: str, timeout: float = 60.0) -> None:
    node = next(n for n in lab.galera.nodes if n.name == name)

    def synced() -> bool:
        st = lab._galera_status(node)
        return st.get("wsrep_local_state_comment") == "Synced" and st.get("wsrep_cluster_status") == "Primary"

    if wait_until(synced, timeout, 0.2) is None:
        raise RuntimeError(f"{name} did not rejoin (Synced, Primary) within {timeout:.0f} s")


# --- HSM, bus -------------------------------------------------------------------------------------------------

def _hsm_down(lab: Any, ctx: dict[str, Any]) -> float:
    began = time.time()
    lab.hsm_down("hsm-a")
    return began


def _hsm_up(lab: Any, ctx: dict[str, Any]) -> None:
    lab.hsm_up("hsm-a")


def signing_stream_leader(lab: Any) -> str:
    """The NATS server leading the PKI_SIGNING stream (JetStream stream info, read with nats-py)."""
    from hapki.contracts import subjects

    async def read() -> str:
        import nats

        nc = await nats.connect(**lab.nats_connect_kwargs(), connect_timeout=2, allow_reconnect=False)
        try:
            info = await nc.jetstream(timeout=5).stream_info(subjects.SIGNING_STREAM)
            if info.cluster is None or not info.cluster.leader:
                raise RuntimeError(f"{subjects.SIGNING_STREAM} has no leader: {info.cluster}")
            return str(info.cluster.leader)
        finally:
            await nc.close()

    return asyncio.run(read())


def _nats_kill(lab: Any, ctx: dict[str, Any]) -> float:
    ctx["node"] = signing_stream_leader(lab)
    return lab.kill_data_node(f"nats@{ctx['node']}")


def _nats_restart(lab: Any, ctx: dict[str, Any]) -> None:
    lab.start_data_node(f"nats@{ctx['node']}")


def _nats_partition(lab: Any, ctx: dict[str, Any]) -> float:
    # The stream leader alone on its side: alive, still reachable by every client connected to it, but it cannot
    # reach a quorum (its stream, consumers and the meta group re-elect leaders among the other two).
    ctx["node"] = leader = signing_stream_leader(lab)
    return _cut(lab, ctx, [(leader, other) for other in sorted(lab.topo.members_by_role("nats")) if other != leader])


def _hsm_all_down(lab: Any, ctx: dict[str, Any]) -> float:
    began = time.time()
    for hsm in sorted(lab.hsms):
        lab.hsm_down(hsm)
    return began


def _hsm_all_up(lab: Any, ctx: dict[str, Any]) -> None:
    for hsm in sorted(lab.hsms):
        lab.hsm_up(hsm)


# --- the whole site -------------------------------------------------------------------------------------------

def _site_crash(lab: Any, ctx: dict[str, Any]) -> float:
    return float(lab.crash_site())


def _site_restart(lab: Any, ctx: dict[str, Any]) -> None:
    """Power back: every member boots at once (Lab.restart_site); what each tier took goes into the run's notes."""
    ctx["notes"] = [f"site back: {lab.restart_site()}"]


# --- operations under load --------------------------------------------------------------------------------------

ROLLOVER_SWITCH_SECONDS = 12.0  # the members read the issuers every 10 s (`issuers_check_seconds`), plus a margin


def _rollover(lab: Any, ctx: dict[str, Any]) -> float:
    """`hapki ca rollover` as an operator runs it; the moment is when the new CA became the default."""
    done = lab.ca("rollover")
    if done.returncode != 0:
        raise RuntimeError(f"hapki ca rollover failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    ctx["issuer"] = done.stdout.split("issuer '", 1)[1].split("'", 1)[0]
    return time.time()


def _rollover_issued_from(lab: Any, ctx: dict[str, Any]) -> None:
    """Not an undo: the check that the active member issues from the new CA by now (its newest certificates)."""

    async def newest() -> set[str]:
        conn = await connect_db(lab)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT issuer FROM certificates ORDER BY created_at DESC LIMIT 5")
                return {row[0] for row in await cur.fetchall()}
        finally:
            conn.close()

    if wait_until(lambda: asyncio.run(newest()) == {ctx["issuer"]}, 5.0, 0.2) is None:
        raise RuntimeError(f"{ROLLOVER_SWITCH_SECONDS:.0f} s after the rollover the newest certificates come from "
                           f"{asyncio.run(newest())}, not {ctx['issuer']}")


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("cara-crash", "SIGSTOP+SIGKILL every process of the active CARA member (keepalived included)",
             _cara_crash, kind="cara"),
    Scenario("cara-graceful", "stop every process of the active CARA member cleanly (SIGTERM)",
             _cara_graceful, kind="cara"),
    Scenario("cara-link", "cut the active CARA member's link for `hold` s, then restore it (it takes the VIP back)",
             _cara_link, _cara_link_restore, kind="cara"),
    Scenario("cara-split-brain", "drop VRRP between the CARA members (both hold the VIP, both sign) for `hold` s",
             *_split_brain("cara"), kind="cara"),
    Scenario("signer-crash", "the active signer SIGKILLs itself right after C_Sign, before its commit "
             "(fail point cara.after_sign); its supervisor (`hapki serve --supervise`) forks it again at once",
             _signer_crash, prepare=_signer_prepare, tail=6.2, kind="cara"),
    Scenario("cara-kill", "SIGKILL the active CARA member's service process at a random moment; its supervisor "
             "forks it again at once (the VIP stays)", _service_kill("cara"), tail=6.0, kind="cara"),
    Scenario("clm-crash", "SIGSTOP+SIGKILL every process of the active CLM member", _clm_crash, kind="clm"),
    Scenario("clm-split-brain", "drop VRRP between the CLM members (both hold the CLM VIP, both run the "
             "schedulers and the outbox sweep) for `hold` s", *_split_brain("clm"), kind="clm"),
    Scenario("clm-kill", "SIGKILL the active CLM member's service process; its supervisor forks it again at once "
             "(the VIP stays)", _service_kill("clm"), tail=6.0, kind="clm"),
    Scenario("db-node-kill", f"SIGKILL Galera {DB_NODE} (first node of every service); restart it (IST) after `hold`",
             _db_kill, _db_restart, hold=8.0, kind="db"),
    Scenario("db-partition", f"partition Galera {DB_NODE} from the other two nodes for `hold` s; it rejoins",
             _db_partition, _db_partition_restore, hold=8.0, kind="db"),
    Scenario("db-minority", f"the active CARA member reaches only {MINORITY_NODE}, which is partitioned into a "
             "non-Primary minority, for `hold` s", _db_minority, _db_minority_restore, hold=20.0, kind="db"),
    Scenario("db-cluster-down", "every Galera node SIGKILLed at once, the services running on; after `hold` all "
             "three start together from their saved view (no bootstrap)", _db_cluster_down, _db_cluster_restart,
             hold=5.0, kind="db"),
    Scenario("hsm-member-down", "hsm-a's token store disappears for `hold` s (every process loses that HSM)",
             _hsm_down, _hsm_up, kind="other"),
    Scenario("hsm-all-down", "both HSM members' token stores disappear for `hold` s: nothing can be signed; the "
             "requests wait, none is lost or fails, and every one is issued once the HSMs are back",
             _hsm_all_down, _hsm_all_up, hold=5.0, kind="other"),
    Scenario("nats-partition", "the NATS server leading the PKI_SIGNING stream is cut off from the other two for "
             "`hold` s (alive, and reachable by its clients); it rejoins", _nats_partition, _uncut,
             hold=25.0, kind="other"),
    Scenario("nats-node-kill", "SIGKILL the NATS server leading the PKI_SIGNING stream; restart it after `hold`",
             _nats_kill, _nats_restart, kind="other"),
    Scenario("site-crash", "the whole site loses power: every process of every member and data node SIGKILLed at "
             "once (SIGSTOP first); after `hold` every member boots and starts its units together, in no order "
             "(each Galera node from its recovered position, none bootstrapping: the Primary Component re-forms from "
             "the saved view)", _site_crash, _site_restart, hold=3.0, tail=20.0, kind="site"),
    Scenario("ca-rollover", "not a failure: `hapki ca rollover` under load (a new issuing CA becomes the default; "
             "every member switches within `issuers_check_seconds`); after `hold` the newest certificates must come "
             "from it", _rollover, _rollover_issued_from, hold=ROLLOVER_SWITCH_SECONDS, kind="other"),
]}
# Other names accepted on the command line.
ALIASES = {"signer-crash-between-sign-and-commit": "signer-crash"}
