"""The lab network: one namespace per member, a router namespace with one bridge per segment, nftables flows.

Layout (names from compose/topology.toml)::

    host: hapki-host 10.213.0.1/30 --veth-- host0 10.213.0.2/30 in hapki-net; route 10.213.0.0/22 via 10.213.0.2
    hapki-net: br-<segment> with the segment gateway; v-<member> (veth) enslaved to its segment's bridge;
               ip_forward=1; nft `inet hapki` (routed flows between segments) and `bridge hapki_faults`
    hapki-<member>: eth0 (the veth's other end) with the member's address, lo up, a route to the lab network
               (10.213.0.0/22) via its segment gateway, and deliberately no default route

Routed traffic between segments passes the `inet hapki` forward chain: policy drop, established/related
accepted, the topology's [[flows]] accepted; anything else gets an ICMP admin-prohibited (a TCP client sees
EHOSTUNREACH at once, instead of hanging until its timeout). Traffic inside a segment is bridged and is not
filtered (br_netfilter is switched off in the router namespace), except by the fault suite's sets:
`@blocked` pairs lose all traffic, `@blocked_vrrp` pairs lose VRRP (IP protocol 112) only; both sets are
checked in the bridge `forward` hook (same segment) and in the inet forward chain (across segments).

Why no default route in the members: with one, a lookup of the host's resolver (from /etc/resolv.conf) left the
member and died in the router, whose ICMP "unreachable" replies are rate-limited; glibc then waited its full 5 s
timeout. rsync's daemon does a reverse lookup per connection, so every Galera SST step took 5 s (33 s per joiner
instead of 3). Without a default route such a lookup fails locally at once, and nothing can leave the lab.

Everything is created with a handful of `ip -batch` runs (one per namespace, in parallel), and `create()` first
removes leftovers of an earlier run: namespaces whose name starts with `<prefix>-` (but not `<prefix>-test-`),
with any process still in them, and the host veth. Nothing outside these names is touched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from hapki.lab.topology import Topology, default

__all__ = ["LabNetwork", "NetworkError", "netns_pids", "nft_ruleset"]

log = logging.getLogger(__name__)

MEMBER_IFACE = "eth0"  # the member's end of its veth, inside its namespace
ROUTER_HOST_IFACE = "host0"  # the router's end of the host link
NFT_TABLE = "hapki"  # inet table in the router namespace
NFT_FAULTS = "hapki_faults"  # bridge table in the router namespace
VRRP_PROTO = 112


class NetworkError(RuntimeError):
    """A command that builds or changes the lab network failed; the message has its stderr."""


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True, timeout: float = 30.0) -> str:
    result = subprocess.run(list(argv), input=stdin, check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        shown = " ".join(argv)
        raise NetworkError(f"`{shown}` failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
                           + (f"\ninput:\n{stdin}" if stdin else ""))
    return result.stdout


def _batch(lines: Iterable[str], namespace: str | None = None) -> subprocess.Popen[str]:
    """Start `ip [-n NS] -batch -` fed with ``lines``; the caller waits with `_finish`."""
    argv = ["ip", *(["-n", namespace] if namespace else []), "-batch", "-"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc._hapki_input = "\n".join(lines) + "\n"  # type: ignore[attr-defined]
    return proc


def _finish(procs: Sequence[subprocess.Popen[str]]) -> None:
    errors = []
    for proc in procs:
        _out, err = proc.communicate(proc._hapki_input, timeout=30)  # type: ignore[attr-defined]
        if proc.returncode != 0:
            errors.append(f"`{' '.join(proc.args)}` failed: {err.strip()}")  # type: ignore[arg-type]
    if errors:
        raise NetworkError("; ".join(errors))


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = _run(["ip", "-j", "netns", "list"], check=False).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def netns_pids(namespace: str) -> list[int]:
    """PIDs of the processes running in a named network namespace."""
    out = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_pids(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM the given PIDs, wait up to ``timeout`` s, SIGKILL the rest."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def nft_ruleset(topo: Topology) -> str:
    """The router namespace's nftables ruleset for ``topo`` (flows, fault sets); idempotent to load with `nft -f`."""
    lines = [
        f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}",
        f"table bridge {NFT_FAULTS}", f"delete table bridge {NFT_FAULTS}",
        f"table inet {NFT_TABLE} {{",
        "  set blocked { type ipv4_addr . ipv4_addr; }",
        "  set blocked_vrrp { type ipv4_addr . ipv4_addr; }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ip saddr . ip daddr @blocked counter drop",
        f"    ip protocol {VRRP_PROTO} ip saddr . ip daddr @blocked_vrrp counter drop",
        "    ct state established,related accept",
        "    ct state invalid drop",
    ]
    for flow in topo.flows:
        src, dst = topo.endpoint(flow.from_), topo.endpoint(flow.to)
        for proto, ports in (("tcp", flow.tcp), ("udp", flow.udp)):
            if ports:
                port_set = ", ".join(str(p) for p in sorted(set(ports)))
                lines.append(f"    ip saddr {src} ip daddr {dst} {proto} dport {{ {port_set} }} counter accept"
                             f" comment \"{flow.from_} -> {flow.to}\"")
    lines += [
        "    counter reject with icmpx type admin-prohibited",
        "  }",
        "}",
        f"table bridge {NFT_FAULTS} {{",
        "  set blocked { type ipv4_addr . ipv4_addr; }",
        "  set blocked_vrrp { type ipv4_addr . ipv4_addr; }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    ip saddr . ip daddr @blocked counter drop",
        f"    ip protocol {VRRP_PROTO} ip saddr . ip daddr @blocked_vrrp counter drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class LabNetwork:
    """Create, inspect, fault and destroy the lab network of one topology."""

    def __init__(self, topo: Topology | None = None) -> None:
        self.topo = topo or default()
        self.router = self.topo.router_namespace
        self.created_in: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def create(self) -> LabNetwork:
        """Build the whole network (after removing leftovers); sets ``created_in`` (seconds)."""
        began = time.monotonic()
        self.destroy()
        topo, router = self.topo, self.router
        members = list(topo.members)

        # Step 1 (host): the namespaces and every veth, each end created straight inside its namespace.
        host = [f"netns add {ns}" for ns in topo.namespaces()]
        host += [f"link add v-{m} netns {router} type veth peer name {MEMBER_IFACE} netns {topo.namespace(m)}"
                 for m in members]
        host.append(f"link add {topo.host_interface} type veth peer name {ROUTER_HOST_IFACE} netns {router}")
        plen = topo.lab.host_link_prefixlen
        host += [
            f"addr add {topo.lab.host_address}/{plen} dev {topo.host_interface}",
            f"link set {topo.host_interface} up",
            f"route replace {topo.lab_network()} via {topo.lab.router_address} dev {topo.host_interface}",
        ]
        _finish([_batch(host)])

        # Step 2 (all namespaces at once): bridges and ports in the router, addresses and routes in members.
        procs = []
        r = ["link set lo up", f"addr add {topo.lab.router_address}/{plen} dev {ROUTER_HOST_IFACE}",
             f"link set {ROUTER_HOST_IFACE} up"]
        for name, seg in topo.segments.items():
            r += [f"link add br-{name} type bridge forward_delay 0 stp_state 0 mcast_snooping 0",
                  f"addr add {seg.gateway}/{seg.subnet.prefixlen} dev br-{name}", f"link set br-{name} up"]
        for m in members:
            r += [f"link set v-{m} master br-{topo.members[m].segment}", f"link set v-{m} up"]
        procs.append(_batch(r, router))
        for m in members:
            seg = topo.segment_of(m)
            procs.append(_batch([
                "link set lo up",
                f"addr add {topo.address(m)}/{seg.subnet.prefixlen} dev {MEMBER_IFACE}",
                f"link set {MEMBER_IFACE} up",
                f"route add {topo.lab_network()} via {seg.gateway}",
            ], topo.namespace(m)))
        _finish(procs)

        # Step 3 (router): forwarding on, bridged traffic kept out of the inet hooks, the flows.
        _run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1",
              "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
              "net.bridge.bridge-nf-call-arptables=0"])
        self.nft(nft_ruleset(topo))
        self.created_in = time.monotonic() - began
        log.info("lab network up in %.2f s", self.created_in)
        return self

    def lab_namespaces(self) -> list[str]:
        """Existing namespaces that belong to the lab: `<prefix>-*`, except `<prefix>-test-*`.

        Namespaces of an earlier topology (a renamed member) count too; `<prefix>-test-*` is left to tests that
        build their own namespace next to a running lab (tests/integration/test_lab_data.py does).
        """
        prefix = f"{self.topo.lab.prefix}-"
        return [ns for ns in list_namespaces() if ns.startswith(prefix) and not ns.startswith(f"{prefix}test-")]

    def destroy(self) -> None:
        """Remove the lab's namespaces (stopping processes left in them) and the host veth. Idempotent."""
        ours = self.lab_namespaces()
        leftovers = [pid for ns in ours for pid in netns_pids(ns)]
        if leftovers:
            log.warning("stopping %d processes left in the lab namespaces: %s", len(leftovers), leftovers)
            _kill_pids(leftovers)
        if ours:
            _finish([_batch(f"netns delete {ns}" for ns in ours)])
        # Deleting the router namespace destroys the host veth with it; a host end left alone is removed here.
        if Path(f"/sys/class/net/{self.topo.host_interface}").exists():
            _run(["ip", "link", "delete", self.topo.host_interface], check=False)

    def exists(self) -> bool:
        """True if the router and every member namespace exist."""
        present = set(list_namespaces())
        return all(ns in present for ns in self.topo.namespaces())

    # --- running things inside ------------------------------------------------------------------------------

    def exec_argv(self, member: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``member``'s namespace (`ip netns exec` keeps the PID: it execs)."""
        return ["ip", "netns", "exec", self.topo.namespace(member), *argv]

    def run_in(self, member: str, argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> str:
        return _run(self.exec_argv(member, argv), check=check, timeout=timeout)

    def nft(self, script: str) -> str:
        """Run an nft script in the router namespace."""
        return _run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], stdin=script)

    # --- observations ---------------------------------------------------------------------------------------

    def addresses(self, member: str) -> set[str]:
        """IPv4 addresses in ``member``'s namespace (empty if the namespace is gone)."""
        out = _run(["ip", "-n", self.topo.namespace(member), "-j", "-4", "addr", "show"], check=False).strip()
        if not out:
            return set()
        return {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}

    def vip_holders(self, tier: str) -> list[str]:
        """Members of ``tier`` whose namespace has the tier's VIP right now (normally exactly one)."""
        vip = str(self.topo.vip(tier))
        return [m for m in self.topo.members_of_tier(tier) if vip in self.addresses(m)]

    # --- faults ---------------------------------------------------------------------------------------------

    def _pair_elements(self, a: str, b: str) -> str:
        x, y = self.topo.address(a), self.topo.address(b)
        return f"{{ {x} . {y}, {y} . {x} }}"

    def _set_pairs(self, set_name: str, a: str, b: str, add: bool) -> None:
        elements = self._pair_elements(a, b)
        script = []
        for family, table in (("inet", NFT_TABLE), ("bridge", NFT_FAULTS)):
            # "add" of a present element is a no-op; "delete" of a missing one fails, so add first to delete.
            script.append(f"add element {family} {table} {set_name} {elements}")
            if not add:
                script.append(f"delete element {family} {table} {set_name} {elements}")
        self.nft("\n".join(script) + "\n")

    def block(self, a: str, b: str) -> None:
        """Drop all IPv4 traffic between members ``a`` and ``b`` (both directions)."""
        self._set_pairs("blocked", a, b, add=True)

    def unblock(self, a: str, b: str) -> None:
        self._set_pairs("blocked", a, b, add=False)

    def block_vrrp(self, tier: str) -> None:
        """Drop VRRP between the two members of ``tier``: both become MASTER (split brain)."""
        a, b = self.topo.members_of_tier(tier)
        self._set_pairs("blocked_vrrp", a, b, add=True)

    def unblock_vrrp(self, tier: str) -> None:
        a, b = self.topo.members_of_tier(tier)
        self._set_pairs("blocked_vrrp", a, b, add=False)

    def clear_faults(self) -> None:
        """Remove every blocked pair and every VRRP block (both tables): the network as `create()` left it."""
        self.nft("".join(f"flush set {family} {table} {name}\n" for family, table in (("inet", NFT_TABLE),
                         ("bridge", NFT_FAULTS)) for name in ("blocked", "blocked_vrrp")))

    def cut_link(self, member: str) -> None:
        """Unplug ``member``: its veth's router end goes down (the member sees carrier loss, keeps its routes)."""
        _run(["ip", "-n", self.router, "link", "set", f"v-{member}", "down"])

    def restore_link(self, member: str) -> None:
        _run(["ip", "-n", self.router, "link", "set", f"v-{member}", "up"])

