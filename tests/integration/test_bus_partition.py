"""A NATS server cut off from its cluster, on a real 3-node JetStream cluster: one node runs in a network namespace
whose route traffic (port 6222) is dropped while its clients' port stays open, as when a switch port of the data
segment fails. The server lives on and keeps its clients, but answers no JetStream request.

- A service connected to it (hapki.runtime.bus.connect, the CLM user) moves to another server by itself
  (QuorumWatchdog) and publishes signing requests again; a connection without the watchdog stays stuck: the test
  can fail.
- Healed, the cut-off server stores into the stream again (within 20 s; 2-10 s measured with the routes' ping
  settings of hapki/lab/templates/nats.conf, 13 s once with nats-server's defaults: this bound does not tell them
  apart; the lab's fault scenario nats-partition, 30 s with the defaults, does).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from hapki.contracts import subjects
from hapki.lab import tls
from hapki.lab.data import NatsCluster, NatsClusterNode
from hapki.lab.local import BusUsers, TlsFiles
from hapki.runtime import bus
from hapki.runtime.config import NatsConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
                       reason="a network namespace and nftables need root, ip(8) and nft(8)"),
]

NETNS = "hapki-test-bus"
HOST_LINK, NS_LINK = "hk-bus-h", "hk-bus-n"
CUT_ADDRESS = "10.214.0.2"  # nats-1, inside the namespace
HOST_ADDRESSES = ["10.214.0.1", "10.214.0.3"]  # nats-2, nats-3, on the host's end of the link
PREFIX = 29
PARTITION = """table inet hapki_test_partition {
  chain input { type filter hook input priority 0; tcp dport 6222 drop; tcp sport 6222 drop; }
  chain output { type filter hook output priority 0; tcp dport 6222 drop; tcp sport 6222 drop; }
}
"""
CUT_OFF_WITHIN = 15.0  # seconds from the cut to a signing request stored through another server (3 probes + moves)
PARTITION_SECONDS = 15.0  # how long the cut lasts (as the chaos scenario nats-partition)
HEALED_WITHIN = 20.0  # seconds from the heal to the cut-off server storing into the stream again


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> None:
    subprocess.run(argv, check=check, capture_output=True, text=True, input=stdin, timeout=30)


def _clean() -> None:
    _run("ip", "netns", "delete", NETNS, check=False)  # a run killed before its clean-up left them
    _run("ip", "link", "delete", HOST_LINK, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    _clean()
    _run("ip", "netns", "add", NETNS)
    try:
        _run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NS_LINK)
        _run("ip", "link", "set", NS_LINK, "netns", NETNS)
        for address in HOST_ADDRESSES:
            _run("ip", "addr", "add", f"{address}/{PREFIX}", "dev", HOST_LINK)
        _run("ip", "link", "set", HOST_LINK, "up")
        _run("ip", "-n", NETNS, "addr", "add", f"{CUT_ADDRESS}/{PREFIX}", "dev", NS_LINK)
        _run("ip", "-n", NETNS, "link", "set", NS_LINK, "up")
        _run("ip", "-n", NETNS, "link", "set", "lo", "up")
        base = tmp_path_factory.mktemp("bus-partition")
        addresses = [CUT_ADDRESS, *HOST_ADDRESSES]
        routes = [f"{address}:6222" for address in addresses]
        nodes = [NatsClusterNode(base, f"nats-{i}", address, routes, netns=NETNS if address == CUT_ADDRESS else None)
                 for i, address in enumerate(addresses, 1)]
        tls.create_infra_ca(base / "tls")
        users = BusUsers(base / "secrets")
        users.accounts_conf()
        nats_cluster = NatsCluster(base, nodes, users=users, tls=lambda n: TlsFiles.issue(
            base / "tls", n.name, [n.address], client_auth=True))
        nats_cluster.start()
        try:
            asyncio.run(_provision(nats_cluster))
            yield nats_cluster
        finally:
            nats_cluster.stop()
    finally:
        _clean()


def _config(cluster: NatsCluster, user: str) -> NatsConfig:
    assert cluster.users is not None
    return NatsConfig(servers=cluster.urls, stream_replicas=3, user=user,
                      password_file=cluster.users.password_file(user),
                      tls_ca_file=cluster.base_dir / "tls" / "infra-ca.pem", quorum_probe_seconds=0.5)


async def _provision(cluster: NatsCluster) -> None:
    nc = await bus.connect(_config(cluster, "admin"), name="provision")
    try:
        deadline = time.monotonic() + 20.0
        while True:
            try:
                await bus.ensure_topology(nc.jetstream(timeout=5), _config(cluster, "admin"), consumer=False,
                                          streams=(subjects.SIGNING_STREAM,))
                return
            except nats.errors.Error:  # a cluster just formed answered "stream not found" to its own creation once
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await bus.close(nc)


async def _onto_cut_server(nc: Client) -> None:
    """Reconnect until the client is on the server that will be cut off (nats-py shuffles the server list)."""
    for _ in range(12):
        if nc.connected_url is not None and nc.connected_url.hostname == CUT_ADDRESS and nc.is_connected:
            return
        await nc.force_reconnect()
        for _ in range(50):
            await asyncio.sleep(0.1)
            if nc.is_connected:
                break
    raise AssertionError(f"could not connect to {CUT_ADDRESS}: on {nc.connected_url}")


async def _publish(nc: Client, n: int) -> bool:
    """One signing request into the R3 stream, as CLM publishes it; True once the stream acknowledged it."""
    try:
        await nc.jetstream(timeout=1).publish(subjects.CARA_SIGN, b"{}", headers={"Nats-Msg-Id": f"partition-{n}"})
    except (TimeoutError, nats.errors.Error):
        return False
    return True


async def _stores_through(url: str, config: NatsConfig) -> bool:
    nc = await nats.connect(servers=[url], allow_reconnect=False, connect_timeout=2, **bus.connect_options(config))
    try:
        return await bus.stream_quorum_problem(nc, subjects.SIGNING_STREAM, 1.0) is None
    finally:
        await nc.close()


async def _lead(cluster: NatsCluster, cut_server_leads: bool) -> None:
    """Make the stream's leader the server to be cut off, or another one (the leader steps down until it is)."""
    admin = await bus.connect(_config(cluster, "admin"), name="leader")
    js = admin.jetstream(timeout=5)
    try:
        for _ in range(20):
            leader = (await js.stream_info(subjects.SIGNING_STREAM)).cluster.leader  # type: ignore[union-attr]
            if leader is not None and (leader == "nats-1") == cut_server_leads:
                return
            if leader is not None:
                await admin.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{subjects.SIGNING_STREAM}", b"", timeout=5)
            await asyncio.sleep(1.0)
        raise AssertionError(f"could not make nats-1 {'the' if cut_server_leads else 'not the'} stream's leader")
    finally:
        await bus.close(admin)


@pytest.mark.parametrize("cut_server_leads", [True, False], ids=["cut-off-leader", "cut-off-follower"])
async def test_a_service_on_a_server_cut_off_from_the_cluster_moves_and_publishes_again(
        cluster: NatsCluster, cut_server_leads: bool) -> None:
    # Whichever way: the cut-off leader answers with silent replicas (sure: moved after 3 probes); a cut-off follower
    # gets no answer, as the majority does while it elects (moved after 15).
    deadline = time.monotonic() + HEALED_WITHIN
    while not all([await _stores_through(url, _config(cluster, "clm")) for url in cluster.urls]):
        assert time.monotonic() < deadline, "the cluster does not store through every server"
        await asyncio.sleep(0.5)
    await _lead(cluster, cut_server_leads)
    watched = await bus.connect(_config(cluster, "clm"), name="watched", stream=subjects.SIGNING_STREAM)
    stuck = await bus.connect(_config(cluster, "clm"), name="unwatched")  # the control: not watched
    try:
        await _onto_cut_server(watched)
        await _onto_cut_server(stuck)
        dog = bus.watchdog_of(watched)
        assert dog is not None and bus.watchdog_of(stuck) is None
        assert await _publish(watched, 0) and await _publish(stuck, 1)
        await asyncio.sleep(2.0)  # healthy: the probes pass (the CLM user may ask), nothing moves
        assert (dog.moves, dog.failures) == (0, 0)

        _run("ip", "netns", "exec", NETNS, "nft", "-f", "-", stdin=PARTITION)
        cut_at = time.monotonic()
        try:
            n = 2
            while not await _publish(watched, n):
                assert time.monotonic() - cut_at < CUT_OFF_WITHIN, (
                    f"still no signing request stored {CUT_OFF_WITHIN} s after the cut; on {watched.connected_url}, "
                    f"{dog.moves} moves, {dog.failures} failed probes")
                n += 1
                await asyncio.sleep(0.2)
            moved_after = time.monotonic() - cut_at
            assert dog.moves >= 1 and watched.connected_url is not None
            assert watched.connected_url.hostname in HOST_ADDRESSES
            # The connection without the watchdog is still on the cut-off server, and still cannot publish.
            assert stuck.connected_url is not None and stuck.connected_url.hostname == CUT_ADDRESS
            assert not await _publish(stuck, n + 1)
            # Longer than a route's write deadline: the servers on the other side close their routes to it.
            await asyncio.sleep(max(0.0, cut_at + PARTITION_SECONDS - time.monotonic()))
        finally:
            _run("ip", "netns", "exec", NETNS, "nft", "delete", "table", "inet", "hapki_test_partition", check=False)
        healed_at = time.monotonic()
        cut_url = next(url for url in cluster.urls if CUT_ADDRESS in url)
        while not await _stores_through(cut_url, _config(cluster, "clm")):
            assert time.monotonic() - healed_at < HEALED_WITHIN, (
                f"{cut_url} still cannot store into the stream {HEALED_WITHIN} s after the partition healed")
            await asyncio.sleep(0.25)
        print(f"moved and published {moved_after:.1f} s after the cut; the cut-off server answered "
              f"{time.monotonic() - healed_at:.1f} s after the heal")
    finally:
        await bus.close(watched)
        await bus.close(stuck)
