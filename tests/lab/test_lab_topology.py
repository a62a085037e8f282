"""The topology description and what is rendered from it (no root, no namespaces needed)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hapki.lab import render, tls
from hapki.lab.network import nft_ruleset
from hapki.lab.topology import DEFAULT_PATH, Topology, default
from pydantic import ValidationError


def raw() -> dict[str, Any]:
    with DEFAULT_PATH.open("rb") as fh:
        return tomllib.load(fh)


def test_the_repository_topology_loads() -> None:
    topo = default()
    assert topo.router_namespace == "hapki-net"
    assert topo.namespace("cara-1") == "hapki-cara-1"
    assert topo.members_of_tier("cara") == ["cara-1", "cara-2"]
    assert topo.members_by_role("db") == ["db-1", "db-2", "db-3"]
    assert topo.members_in_segment("data") == ["db-1", "db-2", "db-3", "nats-1", "nats-2", "nats-3"]
    assert str(topo.vip("clm")) == "10.213.1.100"
    assert topo.peers("cara-2") == ["cara-1"] and topo.peers("nats-1") == ["nats-2", "nats-3"]
    assert topo.tier_of("db-1") is None and topo.tier_of("clm-2") == "clm"
    assert str(topo.lab_network()) == "10.213.0.0/22"
    assert str(topo.endpoint("tier:cara")) == "10.213.2.100/32"
    assert topo.bus.gomaxprocs == 1


def test_the_bus_section_is_optional() -> None:
    data = raw()
    del data["bus"]
    assert Topology.model_validate(data).bus.gomaxprocs is None  # Go's default: a member with cores of its own


@pytest.mark.parametrize("change, message", [
    (lambda d: d["members"]["cara-1"].update(segment="nope"), "unknown segment"),
    (lambda d: d["members"]["cara-1"].update(address="10.213.1.50"), "outside segment cara"),
    (lambda d: d["members"]["db-2"].update(address="10.213.3.21"), "reuses address"),
    (lambda d: d["tiers"]["clm"].update(vrid=51), "vrid 51 already used"),
    (lambda d: d["tiers"]["cara"].update(vip="10.213.1.200"), "VIP 10.213.1.200 is outside segment cara"),
    (lambda d: d["members"]["clm-2"].update(priority=150), "distinct priorities"),
    (lambda d: d["flows"].append({"from": "segment:nowhere", "to": "host", "tcp": [1]}), "unknown flow endpoint"),
    (lambda d: d["lab"].update(surprise=True), "Extra inputs are not permitted"),
    (lambda d: d["bus"].update(gomaxprocs=0), "bus.gomaxprocs"),
])
def test_mistakes_are_refused_with_their_name(change: Any, message: str) -> None:
    data = raw()
    change(data)
    with pytest.raises(ValidationError, match=message):
        Topology.model_validate(data)


def test_keepalived_conf_follows_the_topology() -> None:
    text = render.keepalived_conf(default(), "clm-2")
    for expected in ("vrrp_version 3", "advert_int 0.1", "unicast_src_ip 10.213.1.12", "10.213.1.11",
                     "virtual_router_id 52", "priority 100", "10.213.1.100/24 dev eth0",
                     "vrrp_higher_prio_send_advert true", "vrrp_garp_lower_prio_repeat 1", "router_id hapki-clm-2"):
        assert expected in text
    settings = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in settings if line.startswith("notify")]


def test_a_cara_member_unfit_to_lead_drops_below_its_peer() -> None:
    # The CARA tier tracks /health/primary: a member that fails it loses TRACK_WEIGHT, which must take the
    # preferred member below its peer (else a CA cut off from Galera's quorum would keep the VIP).
    topo = default()
    text = render.keepalived_conf(topo, "cara-1")
    assert "http://127.0.0.1:8081/health/primary" in text and "track_script {" in text
    assert f"weight {render.TRACK_WEIGHT}" in text
    first, second = (topo.members[m].priority for m in topo.tiers["cara"].members)
    assert max(first, second) + render.TRACK_WEIGHT < min(first, second)
    assert "track_script" not in render.keepalived_conf(topo, "clm-1")


@pytest.mark.skipif(shutil.which("keepalived") is None, reason="keepalived not installed")
@pytest.mark.parametrize("member", ["cara-1", "clm-2"])
def test_keepalived_accepts_the_rendered_config(tmp_path: Path, member: str) -> None:
    conf = tmp_path / "keepalived.conf"
    conf.write_text(render.keepalived_conf(default(), member))
    result = subprocess.run(["keepalived", "--config-test", "-f", str(conf)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_the_rendered_config(tmp_path: Path) -> None:
    topo = default()
    ca = tls.create_infra_ca(tmp_path)
    pem = tls.issue_server_cert(ca, tmp_path, "cara-vip", [str(topo.vip("cara"))], ["cara.hapki.lab"])
    files = render.render_member(topo, "cara-2", tmp_path / "cara-2", pem)
    text = files["haproxy.cfg"].read_text()
    assert f"bind 10.213.2.100:443 ssl crt {pem.resolve()} transparent" in text
    # Plain HTTP on the CARA VIP serves only revocation status; the CLM tier has no plain frontend.
    assert "bind 10.213.2.100:80 transparent" in text and "deny deny_status 404 unless { path_beg /ocsp /crl/ }" in text
    clm = render.render_member(topo, "clm-1", tmp_path / "clm-1", pem)["haproxy.cfg"].read_text()
    assert "10.213.1.100:80 " not in clm and "frontend clm_http\n" not in clm
    assert "server cara-2 127.0.0.1:8081 check" in text
    result = subprocess.run(["haproxy", "-c", "-f", str(files["haproxy.cfg"])], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_nft_ruleset_has_exactly_the_flows() -> None:
    rules = nft_ruleset(default())
    assert "policy drop;" in rules and "ct state established,related accept" in rules
    # CLM reaches the CARA VIP on 443 (TLS) and 80 (OCSP and CRLs only, see the haproxy test below).
    assert 'ip saddr 10.213.1.0/24 ip daddr 10.213.2.100/32 tcp dport { 80, 443 } counter accept' in rules
    assert 'ip saddr 10.213.0.1/32 ip daddr 10.213.3.0/24 tcp dport { 3306, 4222, 8222 } counter accept' in rules
    assert rules.count(" accept comment ") == len(default().flows)
    assert "ip protocol 112 ip saddr . ip daddr @blocked_vrrp counter drop" in rules
