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
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w
import yaml

from hapki.cara.config import CaraConfig
from hapki.clm.config import ClmConfig
from hapki.lab import render
from hapki.lab.compose_document import (
    collector,
    compose_document,
    grafana_dashboards,
    grafana_datasources,
    prometheus,
)
from hapki.lab.compose_layout import (
    COMPOSE_DIR,
    HAPKI_UID,
    HSM_ROOT,
    METRICS_PORTS,
    MYSQL_RUN,
    NATS_CONF,
    NATS_SECRETS,
    NATS_STORE,
    SECRETS,
    SOFTHSM_COPIES,
    Consumer,
    check_ranges,
    consumers,
    ifname,
    token_label,
)
from hapki.lab.local import TlsFiles
from hapki.lab.topology import Topology
from hapki.runtime.config import DatabaseConfig, HSMConfig, HSMMember, NatsConfig
from hapki.runtime.grants import CARA_USER, CLM_USER
from hapki.watcher.main import WatcherConfig

__all__ = ["COMPOSE_DIR", "HAPKI_UID", "METRICS_PORTS", "MYSQL_RUN", "SECRETS", "SOFTHSM_COPIES", "Consumer",
           "check", "consumers", "nats_admin", "render_files", "service_config", "token_label", "watcher_config",
           "write"]

HEADER = "# Rendered by `hapki compose render` from compose/topology.toml (hapki.lab.compose): do not edit.\n"


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
        sst_peers=Path(SECRETS / TlsFiles.SST_PEERS),
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


def render_files(topo: Topology) -> dict[str, str]:
    """Every rendered file by its path relative to compose/: the compose file and what it mounts."""
    check_ranges(topo)
    files: dict[str, str] = {}
    for tier, t in topo.tiers.items():
        for m in t.members:
            iface = ifname(topo, m, topo.members[m].segment)
            files[f"rendered/{m}/keepalived.conf"] = render.keepalived_conf(topo, m, interface=iface)
            files[f"rendered/{m}/haproxy.cfg"] = render.haproxy_cfg(topo, m, Path(SECRETS / f"{tier}-vip.pem"))
            files[f"rendered/{m}/{tier}.toml"] = _toml(service_config(topo, m))
            files[f"rendered/{m}/watcher.toml"] = _toml(watcher_config(topo, m))
    for m in topo.members_by_role("db"):
        files[f"rendered/{m}/galera.cnf"] = _galera(topo, m)
    for m in topo.members_by_role("nats"):
        files[f"rendered/{m}/nats.conf"] = _nats_conf(topo, m)
    files["prometheus/prometheus.yml"] = _yaml(prometheus(topo))
    files["otel/collector.yaml"] = _yaml(collector())
    files["grafana/provisioning/datasources/datasources.yaml"] = _yaml(grafana_datasources())
    files["grafana/provisioning/dashboards/dashboards.yaml"] = _yaml(grafana_dashboards())
    files["docker-compose.yml"] = _yaml(compose_document(topo))
    return files


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
