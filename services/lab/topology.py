"""The lab topology (compose/topology.toml) as strict, cross-checked models, with the look-ups the lab needs.

One description drives everything: the network (segments, addresses, allowed flows), the keepalived and haproxy
configs (VIPs, VRIDs, priorities, ports) and the service configs (database and NATS addresses). A typo in the
TOML fails here, at load time, with the offending name, not later as a half-built network.
"""

from __future__ import annotations

import tomllib
from functools import cache
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_PATH", "Flow", "Member", "Segment", "Tier", "Topology", "load"]

# services/lab/topology.py -> parents[2] is the repository root.
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "compose" / "topology.toml"

# Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
_IFNAMSIZ = 15


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LabSettings(_Strict):
    """Names and the host's link into the lab."""

    prefix: str = Field(description="Namespace name prefix: <prefix>-<member>", pattern=r"^[a-z][a-z0-9]{0,9}$")
    router: str = Field(description="Namespace of the router/switch holding one bridge per segment")
    host_address: IPv4Address = Field(description="The host's end of the host<->router link")
    router_address: IPv4Address = Field(description="The router's end of the host<->router link")
    host_link_prefixlen: int = Field(ge=8, le=30, description="Prefix length of the host<->router link")


class Segment(_Strict):
    """One network segment: a bridge in the router namespace, its gateway address on the bridge."""

    subnet: IPv4Network
    gateway: IPv4Address


class Tier(_Strict):
    """An active/passive tier behind a floating IP (VRRP)."""

    vip: IPv4Address = Field(description="Floating IP held by the VRRP master")
    vrid: int = Field(ge=1, le=255, description="VRRP virtual router id (distinct per tier)")
    members: list[str] = Field(min_length=2, max_length=2)
    https_port: int = Field(ge=1, le=65535, description="haproxy TLS port on the VIP")
    backend_port: int = Field(ge=1, le=65535, description="The service's local HTTP port on 127.0.0.1")
    http_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Plain HTTP on the VIP for OCSP (/ocsp) and CRLs (/crl/) only, the way relying parties fetch "
        "them (RFC 5280 4.2.1.13, RFC 6960 A.1: the responses are signed, and TLS to check revocation would be "
        "circular); None: no plain HTTP",
    )
    track_path: str | None = Field(
        default=None, pattern=r"^/[A-Za-z0-9/_-]*$",
        description="keepalived tracks GET 127.0.0.1:backend_port<track_path> every second; while it fails, the "
        "member's VRRP priority drops by TRACK_WEIGHT (below its peer's), so a member unfit to lead gives the VIP "
        "away; None: VIP ownership follows VRRP alone",
    )


class Member(_Strict):
    """One host of the lab (a network namespace)."""

    segment: str
    address: IPv4Address
    priority: int | None = Field(default=None, ge=1, le=254, description="VRRP priority (tier members only)")


class HSM(_Strict):
    members: list[str] = Field(min_length=1, description="HSM member names (SoftHSM2 token sets)")


class Bus(_Strict):
    """How the bus members' nats-servers run."""

    gomaxprocs: int | None = Field(
        default=None, ge=1, le=1024,
        description="GOMAXPROCS of every nats-server (Go's scheduler threads running Go code at once). The "
        "lab's members share one host's cores, three servers beside ten other processes: one each spends less "
        "CPU handing work between threads (docs/PERFORMANCE-HISTORY.md, session 14). None: Go's default, one per core "
        "(a member with cores of its own)",
    )


class Ports(_Strict):
    mariadb: int
    galera: int
    ist: int
    sst: int
    nats_client: int
    nats_cluster: int
    nats_monitor: int


class Flow(_Strict):
    """An allowed connection between segments: `host`, `segment:<name>` or `tier:<name>` (the tier's VIP)."""

    from_: str = Field(alias="from")
    to: str
    tcp: list[int] = Field(default_factory=list)
    udp: list[int] = Field(default_factory=list)


class Topology(_Strict):
    """The whole lab: validated across sections (every name resolves, addresses sit in their segments)."""

    lab: LabSettings
    segments: dict[str, Segment]
    tiers: dict[str, Tier]
    members: dict[str, Member]
    hsm: HSM
    bus: Bus = Field(default_factory=Bus)
    ports: Ports
    flows: list[Flow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        problems: list[str] = []
        seen: dict[IPv4Address, str] = {}

        def claim(address: IPv4Address, owner: str) -> None:
            if address in seen:
                problems.append(f"{owner} reuses address {address} of {seen[address]}")
            seen[address] = owner

        link = IPv4Interface(f"{self.lab.host_address}/{self.lab.host_link_prefixlen}").network
        if self.lab.router_address not in link:
            problems.append(f"router_address {self.lab.router_address} is not on the host link {link}")
        claim(self.lab.host_address, "lab.host_address")
        claim(self.lab.router_address, "lab.router_address")
        for name, seg in self.segments.items():
            if seg.gateway not in seg.subnet:
                problems.append(f"segment {name}: gateway {seg.gateway} is outside {seg.subnet}")
            if seg.subnet.overlaps(link):
                problems.append(f"segment {name}: {seg.subnet} overlaps the host link {link}")
            if len(f"br-{name}") > _IFNAMSIZ:
                problems.append(f"segment {name}: name too long for a bridge name")
            claim(seg.gateway, f"segment {name} gateway")
        for name, m in self.members.items():
            seg = self.segments.get(m.segment)
            if seg is None:
                problems.append(f"member {name}: unknown segment {m.segment!r}")
            elif m.address not in seg.subnet:
                problems.append(f"member {name}: {m.address} is outside segment {m.segment} ({seg.subnet})")
            if len(f"v-{name}") > _IFNAMSIZ:
                problems.append(f"member {name}: name too long for an interface name")
            claim(m.address, f"member {name}")
        vrids: dict[int, str] = {}
        for name, tier in self.tiers.items():
            if tier.vrid in vrids:
                problems.append(f"tier {name}: vrid {tier.vrid} already used by tier {vrids[tier.vrid]}")
            vrids[tier.vrid] = name
            claim(tier.vip, f"tier {name} VIP")
            segs = set()
            for member in tier.members:
                m = self.members.get(member)
                if m is None:
                    problems.append(f"tier {name}: unknown member {member!r}")
                    continue
                segs.add(m.segment)
                if m.priority is None:
                    problems.append(f"tier {name}: member {member} has no VRRP priority")
            if len(segs) > 1:
                problems.append(f"tier {name}: members on several segments {sorted(segs)}")
            for seg_name in segs:
                if seg_name in self.segments and tier.vip not in self.segments[seg_name].subnet:
                    problems.append(f"tier {name}: VIP {tier.vip} is outside segment {seg_name}")
            prios = [self.members[m].priority for m in tier.members if m in self.members]
            if len(set(prios)) != len(prios):
                problems.append(f"tier {name}: members need distinct priorities, got {prios}")
        for i, flow in enumerate(self.flows):
            for end in (flow.from_, flow.to):
                try:
                    self.endpoint(end)
                except ValueError as exc:
                    problems.append(f"flow {i + 1}: {exc}")
            for port in (*flow.tcp, *flow.udp):
                if not 1 <= port <= 65535:
                    problems.append(f"flow {i + 1}: port {port} out of range")
            if not flow.tcp and not flow.udp:
                problems.append(f"flow {i + 1}: no tcp or udp ports")
        if problems:
            raise ValueError("invalid topology: " + "; ".join(problems))
        return self

    # --- names ----------------------------------------------------------------------------------------------

    @property
    def router_namespace(self) -> str:
        """The router/switch namespace (`hapki-net`)."""
        return self.lab.router

    def namespace(self, member: str) -> str:
        """Network namespace of ``member`` (`hapki-<member>`)."""
        self._member(member)
        return f"{self.lab.prefix}-{member}"

    def cert_dns_names(self, member: str) -> list[str]:
        """DNS names in a data-tier member's TLS certificate (besides its address), in the lab and the demo alike.

        The bare member name comes first: a Galera donor's SST stunnel checks the joiner's certificate against the
        joiner's node name (MariaDB hands it to wsrep_sst_rsync as the remote user; the script makes it a
        ``checkHost``, which stunnel then requires ahead of any ``checkIP``)."""
        self._member(member)
        return [member, f"{member}.{self.lab.prefix}.lab"]

    def namespaces(self) -> list[str]:
        """Every namespace of the lab: the router first, then the members."""
        return [self.router_namespace, *(self.namespace(m) for m in self.members)]

    @property
    def host_interface(self) -> str:
        """The host's end of the host<->router veth (`hapki-host`)."""
        return f"{self.lab.prefix}-host"

    # --- members, tiers, segments ---------------------------------------------------------------------------

    def _member(self, member: str) -> Member:
        try:
            return self.members[member]
        except KeyError:
            raise KeyError(f"unknown member {member!r}; known: {sorted(self.members)}") from None

    def address(self, member: str) -> IPv4Address:
        return self._member(member).address

    def segment_of(self, member: str) -> Segment:
        return self.segments[self._member(member).segment]

    def members_of_tier(self, tier: str) -> list[str]:
        """Members of an active/passive tier (`cara`, `clm`), in the order of the TOML."""
        return list(self.tiers[tier].members)

    def members_in_segment(self, segment: str) -> list[str]:
        if segment not in self.segments:
            raise KeyError(f"unknown segment {segment!r}")
        return [name for name, m in self.members.items() if m.segment == segment]

    def members_by_role(self, role: str) -> list[str]:
        """Members named `<role>-<n>` (`db`, `nats`, ...): the roles that are not VRRP tiers."""
        return [name for name in self.members if name.rsplit("-", 1)[0] == role]

    def tier_of(self, member: str) -> str | None:
        """The VRRP tier ``member`` belongs to, or None (database, bus)."""
        self._member(member)
        return next((name for name, t in self.tiers.items() if member in t.members), None)

    def vip(self, tier: str) -> IPv4Address:
        """Floating IP of ``tier``."""
        return self.tiers[tier].vip

    def peers(self, member: str) -> list[str]:
        """The other members of ``member``'s tier (VRRP peers), else of its role (Galera/NATS cluster peers)."""
        tier = self.tier_of(member)
        group = self.members_of_tier(tier) if tier else self.members_by_role(member.rsplit("-", 1)[0])
        return [m for m in group if m != member]

    # --- flows ----------------------------------------------------------------------------------------------

    def endpoint(self, spec: str) -> IPv4Network:
        """The address range of a flow endpoint: `host`, `segment:<name>` (its subnet), `tier:<name>` (its VIP)."""
        kind, _, name = spec.partition(":")
        if spec == "host":
            return IPv4Network(f"{self.lab.host_address}/32")
        if kind == "segment" and name in self.segments:
            return self.segments[name].subnet
        if kind == "tier" and name in self.tiers:
            return IPv4Network(f"{self.tiers[name].vip}/32")
        raise ValueError(f"unknown flow endpoint {spec!r} (host, segment:<name> or tier:<name>)")

    def lab_network(self) -> IPv4Network:
        """The smallest network holding every segment and the host link (the host routes it to the router)."""
        nets = [s.subnet for s in self.segments.values()]
        nets.append(IPv4Interface(f"{self.lab.host_address}/{self.lab.host_link_prefixlen}").network)
        net = nets[0]
        while not all(n.subnet_of(net) for n in nets):
            net = net.supernet()
        return net


def load(path: Path | None = None) -> Topology:
    """Load and validate a topology file (default: the repository's compose/topology.toml)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    with path.open("rb") as fh:
        return Topology.model_validate(tomllib.load(fh))


@cache
def default() -> Topology:
    """The repository's topology, loaded once."""
    return load()
