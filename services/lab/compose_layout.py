"""Where everything is in the Docker Compose demo: user ids, paths inside the containers, ports, images, which
container gets which secrets, and how the topology's segments become Docker networks.

Shared by the renderer (hapki.lab.compose, hapki.lab.compose_document) and the demo's init and provision
one-shots (hapki.lab.compose_init), so what the configs name and what the init makes cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path, PurePosixPath

from hapki.lab.topology import Topology
from hapki.runtime.grants import ADMIN_USER, CARA_USER, CLM_USER
from hapki.runtime.metrics import PORTS

__all__ = ["ALERT_RULES", "COMPOSE_DIR", "ISSUER", "METRICS_PORTS", "Consumer", "check_ranges", "consumers", "dynamic_range", "ifname",
           "reachable_segments", "token_label"]

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
# The alerting rules (hand-written): the Compose demo's Prometheus and the lab's load them.
ALERT_RULES = COMPOSE_DIR / "prometheus" / "alerts.yml"

# Fixed user ids, so the init container can hand each container its own files (compose/images/*/Dockerfile).
HAPKI_UID = 10001
NATS_UID = 10002
MYSQL_UID = 10003
GRAFANA_UID = 472  # the grafana/grafana image's user
ROOT_UID = 0

# Inside the containers.
SECRETS = PurePosixPath("/run/hapki")  # where a container's own secrets volume is mounted
ISSUER = "_issuer"  # the init's own secrets: the infrastructure CA's key, the master copies
NATS_SECRETS = PurePosixPath("/etc/nats/secrets")  # beside nats.conf: NATS resolves `include` relative to it
ETC = PurePosixPath("/etc/hapki")
HSM_ROOT = PurePosixPath("/var/lib/hsm")
SOFTHSM_COPIES = PurePosixPath("/usr/local/lib/hapki")  # libsofthsm2-<member>.so, made in the image
MYSQL_RUN = PurePosixPath("/run/mysqld")
GALERA_CNF = PurePosixPath("/etc/mysql/hapki/galera.cnf")
NATS_CONF = PurePosixPath("/etc/nats/nats.conf")
NATS_STORE = PurePosixPath("/var/lib/nats")

# Prometheus endpoints (/metrics) of the services, on each member's address: fixed for the demo and the lab (the
# services' MetricsConfig defaults, defined once in hapki.runtime.metrics).
METRICS_PORTS = PORTS
METRICS_PATH = "/metrics"
OTLP_HTTP = "http://otel-collector:4318"  # runtime/telemetry.py exports OTLP over HTTP when this is set

# Third-party images, pinned (no `latest`: a demo that changes under its users is not a demo).
IMAGES = {
    "otel-collector": "otel/opentelemetry-collector-contrib:0.115.0",
    "jaeger": "jaegertracing/jaeger:2.1.0",
    "prometheus": "prom/prometheus:v3.0.1",
    "grafana": "grafana/grafana:11.4.0",
}
# Where the user reaches the UIs: bound to the Docker host's loopback only.
PUBLISHED = {"grafana": (3000, 3000), "jaeger": (16686, 16686), "prometheus": (9090, 9090)}


@dataclass(frozen=True)
class Consumer:
    """A container that gets its own secrets volume (``secrets-<name>``, mounted at ``mount``)."""

    name: str
    uid: int
    mount: PurePosixPath = SECRETS
    bus_users: tuple[str, ...] = ()
    db_users: tuple[str, ...] = ()
    tls_name: str | None = None  # a server certificate (data-tier node: also a client of its peers)
    tls_address: str | None = None
    tls_dns: tuple[str, ...] = ()
    sst_peers: bool = False  # a Galera node: the SST's trust list (the CA and every member's certificate)
    vip_tier: str | None = None  # haproxy's PEM for this tier's VIP
    approval: str | None = None  # "private" (CLM) or "public" (CARA)
    accounts: bool = False  # the NATS users block (nats.conf includes it)
    grafana_admin: bool = False  # Grafana's admin password (anonymous visitors may only view)


def consumers(topo: Topology) -> dict[str, Consumer]:
    """Every container with secrets, and what each gets: the one table `hapki compose init` writes from."""
    out: dict[str, Consumer] = {}
    def dns(m: str) -> tuple[str, ...]:  # as the lab names its data-tier certificates
        return tuple(topo.cert_dns_names(m))

    for m in topo.members_by_role("db"):
        out[m] = Consumer(m, MYSQL_UID, tls_name=m, tls_address=str(topo.address(m)), tls_dns=dns(m),
                          sst_peers=True)
    for m in topo.members_by_role("nats"):
        out[m] = Consumer(m, NATS_UID, NATS_SECRETS, tls_name=m, tls_address=str(topo.address(m)), tls_dns=dns(m),
                          accounts=True)
    for tier, t in topo.tiers.items():
        db_user = {"cara": CARA_USER, "clm": CLM_USER}[tier]
        for m in t.members:
            out[m] = Consumer(m, HAPKI_UID, bus_users=(tier,), db_users=(db_user,), vip_tier=tier,
                              approval="public" if tier == "cara" else "private")
            out[f"watcher-{m}"] = Consumer(f"watcher-{m}", HAPKI_UID, bus_users=(f"watcher-{m}",))
    # The provisioner: database users over db-1's root socket, migrations, grants, streams, `hapki ca init`.
    out["provision"] = Consumer("provision", ROOT_UID, bus_users=("admin",),
                                db_users=(ADMIN_USER, CARA_USER, CLM_USER), approval="public")
    # What a user of the demo reads out of the volume (README): the bus client's password and the TLS CA.
    out["client"] = Consumer("client", ROOT_UID, bus_users=("client",))
    out["grafana"] = Consumer("grafana", GRAFANA_UID, grafana_admin=True)
    return out



def token_label(hsm: str) -> str:
    """SoftHSM token label of an HSM member, as in the lab: hsm-a -> hapki-a."""
    return f"hapki-{hsm.rsplit('-', 1)[-1]}"


def dynamic_range(subnet: IPv4Network) -> IPv4Network:
    """The part of a segment Docker may hand out (secondary attachments, observability): its last quarter.

    The topology's own addresses (members, VIPs, gateway) must lie below it; check_ranges() says so otherwise.
    """
    return list(subnet.subnets(prefixlen_diff=2))[-1]


def ifname(topo: Topology, member: str, segment: str) -> str:
    """Interface name of ``member`` on ``segment``: eth0 on its own (keepalived's), eth-<segment> elsewhere."""
    return "eth0" if topo.members[member].segment == segment else f"eth-{segment}"


def reachable_segments(topo: Topology, segment: str) -> list[str]:
    """Other segments that ``segment`` may open connections to by the topology's flows (a tier: its segment)."""
    found: list[str] = []
    for flow in topo.flows:
        if flow.from_ != f"segment:{segment}":
            continue
        kind, _, name = flow.to.partition(":")
        target = name if kind == "segment" else topo.members[topo.members_of_tier(name)[0]].segment
        if target != segment and target not in found:
            found.append(target)
    return found


def check_ranges(topo: Topology) -> None:
    problems = []
    for name, seg in topo.segments.items():
        dynamic = dynamic_range(seg.subnet)
        fixed = [(m, mm.address) for m, mm in topo.members.items() if mm.segment == name]
        fixed += [(f"{t} VIP", tt.vip) for t, tt in topo.tiers.items() if tt.vip in seg.subnet]
        problems += [f"{who} {addr} lies in {name}'s dynamic range {dynamic}" for who, addr in fixed if addr in dynamic]
    if problems:
        raise ValueError("the compose demo needs the topology's addresses below each segment's last quarter: "
                         + "; ".join(problems))
