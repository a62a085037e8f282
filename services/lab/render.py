"""Render the config templates in hapki/lab/templates/ for one member of the topology.

Templates use `string.Template` (`${name}`): the configs are full of braces, and `substitute` refuses a
template that names a value we do not supply, so a template and this module cannot silently drift.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

from hapki.cara.config import OcspConfig
from hapki.lab.local import TlsFiles
from hapki.lab.network import MEMBER_IFACE
from hapki.lab.topology import Topology

__all__ = ["ADVERT_INT", "GALERA_PROVIDER", "galera_cnf", "haproxy_cfg", "keepalived_conf", "nats_conf",
           "render_member", "template"]

GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"

ADVERT_INT = 0.1  # seconds; 0.02 flapped under CPU load on these machines, 0.1 did not (FIELD-NOTES)
GARP_REFRESH = 5  # seconds between gratuitous ARP refreshes while MASTER
# The track script (tiers with track_path): failing `fall` checks in a row takes TRACK_WEIGHT off the member's
# priority (150 -> 50, below its peer's 100); `rise` good checks give it back. A check is bounded by its own
# timeout so that a hung service counts as failing.
TRACK_INTERVAL, TRACK_TIMEOUT, TRACK_FALL, TRACK_RISE, TRACK_WEIGHT = 1, 2, 2, 2, -100
TRACK_CURL_SECONDS = 1.5
# haproxy's OCSP cache: answers are about 1 KiB (the response and the delegated signer's certificate) plus headers;
# 32 MiB holds tens of thousands of certificates' answers for the few seconds they may be kept.
OCSP_CACHE_MB, OCSP_MAX_OBJECT_BYTES = 32, 16384
# CLM holds an issue request open while it waits for the CA (ClmConfig.wait_seconds, at most 60 s).
SERVER_TIMEOUT = 65


def template(name: str) -> Template:
    """A template shipped in hapki/lab/templates/."""
    return Template(resources.files("hapki.lab").joinpath("templates", name).read_text(encoding="utf-8"))


def _tier_member(topo: Topology, member: str) -> str:
    tier = topo.tier_of(member)
    if tier is None:
        raise ValueError(f"member {member!r} is in no VRRP tier; keepalived and haproxy run on tier members only")
    return tier


def keepalived_conf(topo: Topology, member: str, *, advert_int: float = ADVERT_INT,
                    interface: str = MEMBER_IFACE) -> str:
    """keepalived.conf of a tier member: VRRPv3, unicast to its peer, the tier VIP on its ``interface`` (the one on
    its own segment)."""
    tier = _tier_member(topo, member)
    t = topo.tiers[tier]
    peers = "\n".join(f"        {topo.address(p)}" for p in topo.peers(member))
    track_script = track_use = ""
    if t.track_path is not None:
        url = f"http://127.0.0.1:{t.backend_port}{t.track_path}"
        track_script = (
            f"\nvrrp_script hapki_{tier}_fit {{\n"
            f"    script \"/usr/bin/curl -sf -o /dev/null --max-time {TRACK_CURL_SECONDS} {url}\"\n"
            f"    interval {TRACK_INTERVAL}\n    timeout {TRACK_TIMEOUT}\n    fall {TRACK_FALL}\n"
            f"    rise {TRACK_RISE}\n    weight {TRACK_WEIGHT}\n}}\n")
        track_use = f"    track_script {{\n        hapki_{tier}_fit\n    }}\n"
    return template("keepalived.conf").substitute(
        track_script=track_script, track_use=track_use,
        member=member, tier=tier, router_id=topo.namespace(member), garp_refresh=GARP_REFRESH,
        instance=f"hapki_{tier}", interface=interface, vrid=t.vrid, priority=topo.members[member].priority,
        advert_int=advert_int, address=topo.address(member), unicast_peers=peers, vip=t.vip,
        prefixlen=topo.segment_of(member).subnet.prefixlen,
    )


def haproxy_cfg(topo: Topology, member: str, pem: Path) -> str:
    """haproxy.cfg of a tier member: TLS on VIP:https_port with ``pem`` -> 127.0.0.1:backend_port, and plain
    HTTP on VIP:http_port for OCSP and CRL paths only, if the tier has one. A tier that serves OCSP (the one with
    an http_port) also caches OCSP GET answers and keeps its backend connections open."""
    tier = _tier_member(topo, member)
    t = topo.tiers[tier]
    plain = ocsp_rules = ocsp_cache = ""
    if t.http_port is not None:
        plain = template("haproxy-http.cfg").substitute(tier=tier, vip=t.vip, http_port=t.http_port)
        ocsp_rules = template("haproxy-ocsp-rules.cfg").substitute(tier=tier)
        ocsp_cache = template("haproxy-ocsp-cache.cfg").substitute(
            tier=tier, cache_mb=OCSP_CACHE_MB, max_object_bytes=OCSP_MAX_OBJECT_BYTES,
            max_age=OcspConfig().http_max_age_seconds)
    return template("haproxy.cfg").substitute(
        member=member, tier=tier, vip=t.vip, https_port=t.https_port, pem=Path(pem).resolve(),
        backend_port=t.backend_port, server_timeout=SERVER_TIMEOUT, plain_http=plain, ocsp_rules=ocsp_rules,
        ocsp_cache=ocsp_cache,
    )


def galera_cnf(
    *, name: str, address: str, peers: Sequence[str], datadir: Path, socket: Path, pid_file: Path, port: int,
    galera_port: int, ist_port: int, sst_port: int, sst_method: str, log_path: Path | None, user: str = "root",
    tls: TlsFiles | None = None, provider: str = GALERA_PROVIDER, sst_peers: Path | None = None,
) -> str:
    """my.cnf of Galera node ``name``; ``peers`` are the members' ``host:port`` for gcomm://. ``log_path`` None:
    the server logs to stderr (a container's log). ``tls``: client TLS required on TCP, replication and IST
    encrypted, and the rsync SST runs through stunnel with ``sst_peers`` (the CA and every member's certificate) as
    its trust list: a TLS node without it would transfer its state in the clear, so that is refused here."""
    if tls is not None and sst_peers is None:
        raise ValueError(f"Galera node {name}: TLS without an SST peers bundle would send the state transfer in the "
                         "clear; pass sst_peers (TlsFiles.sst_peers_bundle)")
    sst = ["# rsync SST through stunnel: each end accepts only a cluster member's own certificate, and the donor",
           "# checks it names the joiner (node name, else address). Without stunnel the SST fails, never goes plain.",
           *(f"{k}={v}" for k, v in tls.sst_options(sst_peers).items())] if tls and sst_peers else []
    tls_lines = ["# Client TLS (hapki.lab.tls infrastructure CA): required on TCP; root on the socket is local.",
                 *(f"{k}={v}" for k, v in tls.mariadb_options().items()),
                 "", "[sst]", *sst] if tls else []
    log_error = f"log-error={log_path}" if log_path is not None else "# no log-error: the server logs to stderr"
    return template("galera.cnf").substitute(
        name=name, user=user, datadir=datadir, socket=socket, pid_file=pid_file, port=port, address=address,
        log_error=log_error, provider=provider, galera_port=galera_port, ist_port=ist_port, peers=",".join(peers),
        sst_method=sst_method, sst_port=sst_port,
        provider_tls=f";{tls.galera_provider_options()}" if tls else "", tls="\n".join(tls_lines) + "\n",
    )


def nats_conf(
    *, name: str, address: str, client_port: int, cluster_port: int, monitor_port: int, routes: Sequence[str],
    pid_file: Path, store_dir: Path, tls: TlsFiles | None = None, accounts: str | None = None,
) -> str:
    """nats-server.conf of JetStream cluster node ``name``; ``routes`` are ``nats-route://host:port`` URLs.
    ``accounts``: the users block (hapki.runtime.bus_auth), or an ``include`` of a file holding it."""
    return template("nats.conf").substitute(
        name=name, name_json=json.dumps(name), address=address, client_port=client_port,
        monitor_port=monitor_port, pid_file_json=json.dumps(str(pid_file)),
        store_dir_json=json.dumps(str(store_dir)), cluster_port=cluster_port,
        routes="\n".join(f"    {json.dumps(r)}" for r in routes),
        cluster_tls=f"  tls: {json.dumps(tls.nats_cluster_tls())}" if tls else "",
        security="\n".join(part for part in (accounts, tls.nats_block() if tls else None) if part),
    )


def render_member(topo: Topology, member: str, out_dir: Path, pem: Path) -> dict[str, Path]:
    """Write keepalived.conf and haproxy.cfg of ``member`` into ``out_dir``; return their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    texts = {"keepalived.conf": keepalived_conf(topo, member), "haproxy.cfg": haproxy_cfg(topo, member, pem)}
    for name, text in texts.items():
        path = out_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)  # keepalived refuses configs that others can write
        tmp.replace(path)
        written[name] = path
    return written
