"""The lab network: the topology's flows are the only way between segments; TLS on the VIPs; status; link cuts."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hapki.lab.ha import Lab

pytestmark = pytest.mark.lab

_CONNECT = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("ok")
except socket.timeout:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)))
"""


def connect_from(lab: Lab, member: str | None, host: str, port: int) -> str:
    """TCP connect from ``member``'s namespace (None: the host): "ok", "timeout" or the errno name."""
    if member is None:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return "ok"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return str(exc.errno and __import__("errno").errorcode.get(exc.errno))
    return lab.net.run_in(member, [sys.executable, "-c", _CONNECT, host, str(port)]).strip()


@pytest.fixture
def listener_on_cara_member(lab: Lab) -> Iterator[tuple[str, int]]:
    """A TCP listener on cara-1's own address, port 8081 (the real CARA binds 127.0.0.1:8081 only)."""
    member = lab.topo.members_of_tier("cara")[0]
    address, port = str(lab.topo.address(member)), lab.topo.tiers["cara"].backend_port
    proc = subprocess.Popen(lab.net.exec_argv(member, [sys.executable, "-c", (
        "import socket, time\n"
        f"s = socket.create_server(({address!r}, {port}))\n"
        "while True:\n    c, _ = s.accept(); c.close()\n")]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while connect_from(lab, member, address, port) != "ok":
            assert time.monotonic() < deadline, "test listener did not come up"
            time.sleep(0.05)
        yield address, port
    finally:
        proc.kill()
        proc.wait()


def test_clm_reaches_the_database_and_the_bus(lab: Lab) -> None:
    clm = lab.topo.members_of_tier("clm")[0]
    ports = lab.topo.ports
    assert connect_from(lab, clm, str(lab.topo.address("db-1")), ports.mariadb) == "ok"
    assert connect_from(lab, clm, str(lab.topo.address("nats-2")), ports.nats_client) == "ok"


def test_clm_reaches_the_cara_vip_but_not_a_cara_member(lab: Lab, listener_on_cara_member: tuple[str, int]) -> None:
    address, port = listener_on_cara_member
    clm = lab.topo.members_of_tier("clm")[0]
    cara_peer = lab.topo.members_of_tier("cara")[1]
    # Inside the CARA segment nothing is filtered: the listener is reachable ...
    assert connect_from(lab, cara_peer, address, port) == "ok"
    # ... but not from the CLM segment (only tier:cara port 443 is allowed), nor from the host.
    assert connect_from(lab, clm, address, port) == "EHOSTUNREACH"  # nft: reject with admin-prohibited
    assert connect_from(lab, None, address, port) == "EHOSTUNREACH"
    assert connect_from(lab, clm, str(lab.topo.vip("cara")), 443) == "ok"


def test_other_flows_are_closed(lab: Lab) -> None:
    cara = lab.topo.members_of_tier("cara")[0]
    clm = lab.topo.members_of_tier("clm")[0]
    # The data segment answers the allowed ports only: the NATS cluster port is not a flow.
    assert connect_from(lab, clm, str(lab.topo.address("nats-1")), lab.topo.ports.nats_cluster) == "EHOSTUNREACH"
    # CARA -> CLM is no flow at all (not even to its VIP).
    assert connect_from(lab, cara, str(lab.topo.vip("clm")), 443) == "EHOSTUNREACH"
    # The host reaches the data segment on 3306/4222/8222 only.
    assert connect_from(lab, None, str(lab.topo.address("db-1")), lab.topo.ports.galera) == "EHOSTUNREACH"
    assert connect_from(lab, None, str(lab.topo.address("db-1")), lab.topo.ports.mariadb) == "ok"


def test_members_have_no_default_route(lab: Lab) -> None:
    # Nothing in the lab can address anything outside it; lookups of the host's resolver fail at once.
    for member in lab.topo.members:
        routes = lab.net.run_in(member, ["ip", "-4", "route", "show"])
        assert "default" not in routes, routes
        assert str(lab.topo.lab_network()) in routes


@pytest.mark.parametrize("tier", ["cara", "clm"])
def test_https_on_the_vip_from_the_host(lab: Lab, tier: str) -> None:
    url = lab.url(tier) + "/health"
    ok = subprocess.run(["curl", "-sS", "--max-time", "5", "--cacert", str(lab.ca_bundle), "-o", "/dev/null",
                         "-w", "%{http_code}", url], check=False, capture_output=True, text=True)
    assert ok.stdout == "200", ok.stderr
    # The certificate is the lab's infrastructure CA's, not trusted by the system.
    untrusted = subprocess.run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", url], check=False,
                               capture_output=True)
    assert untrusted.returncode == 60  # peer certificate cannot be authenticated


def _passive_opens(lab: Lab, member: str) -> int:
    """TCP connections accepted in ``member``'s namespace so far (Tcp PassiveOpens of its /proc/net/snmp)."""
    header, values = (line.split() for line in lab.net.run_in(member, ["cat", "/proc/net/snmp"]).splitlines()
                      if line.startswith("Tcp:"))
    return int(values[header.index("PassiveOpens")])


@pytest.mark.parametrize("tier", ["cara", "clm"])
def test_the_proxy_reuses_its_connections_to_the_service_behind_it(lab: Lab, tier: str) -> None:
    """haproxy keeps its connections to the local service open: a hundred requests through the VIP open a handful
    of connections on the member (its health checks, keepalived's track script), not one each. One per request
    overflowed CLM's accept queue under load, and the dropped connects failed requests with 503 or EOF."""
    requests = 100
    member = lab.vip_holders(tier)[0]
    url = urlsplit(lab.url(tier))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443, timeout=5,
                                       context=ssl.create_default_context(cafile=str(lab.ca_bundle)))
    try:
        before = _passive_opens(lab, member)
        for _ in range(requests):
            conn.request("GET", "/health")
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200
        opened = _passive_opens(lab, member) - before
    finally:
        conn.close()
    assert opened < requests // 4, f"{opened} connections accepted on {member} for {requests} requests"


def test_cut_link_moves_the_vip_and_restoring_brings_it_back(lab: Lab, timing: Callable[[str, float], None]) -> None:
    tier = "cara"
    holder = lab.preferred(tier)
    backup = next(m for m in lab.topo.members_of_tier(tier) if m != holder)
    lab.net.cut_link(holder)
    took = lab.wait_vip(tier, backup, 2.0)  # the cut member sees carrier loss: FAULT, it drops the VIP
    assert took is not None, lab.vip_holders(tier)
    timing("cara.cut_link_failover", took)
    lab.net.restore_link(holder)
    back = lab.wait_vip(tier, holder, 3.0)
    assert back is not None, lab.vip_holders(tier)


def test_status_reports_the_whole_lab(lab: Lab) -> None:
    st = lab.status()
    assert st["state"] == "up"
    assert all(m["up"] for m in st["members"].values())
    assert all(p["alive"] for m in st["members"].values() for p in m["processes"].values())
    assert {t: v["holders"] for t, v in st["tiers"].items()} == {t: [lab.preferred(t)] for t in lab.topo.tiers}
    assert {t: v["unfit"] for t, v in st["tiers"].items()} == {t: {} for t in lab.topo.tiers}  # scripts risen
    assert all(g.get("wsrep_local_state_comment") == "Synced" for g in st["galera"].values()), st["galera"]
    assert all(n["healthy"] for n in st["nats"]["nodes"].values()), st["nats"]
    signing = st["nats"]["streams"]["PKI_SIGNING"]
    assert signing["replicas"] == 3 and signing["leader"] and all(r["current"] for r in signing["followers"])
    assert st["hsm"] == {m: {"hsm-a": True, "hsm-b": True} for m in lab.topo.members_of_tier("cara")}
    assert st["client"]["nats_urls"] == lab.nats_urls and st["client"]["clm_url"] == "https://10.213.1.100"


def test_nats_servers_run_with_the_topologys_scheduler_threads(lab: Lab) -> None:
    # compose/topology.toml's [bus] gomaxprocs reaches every running nats-server (read from the kernel, not from
    # our own argv): the lab's members share the host's cores.
    assert lab.topo.bus.gomaxprocs == 1
    for node in lab.nats.nodes:
        pid = int(node.pid_file.read_text().strip())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert Path(f"/proc/{pid}/exe").resolve().name == "nats-server", pid
        assert b"GOMAXPROCS=1" in environ, (node.name, pid)

