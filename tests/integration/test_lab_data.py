"""Integration tests of hapki.lab.data: a real 3-node Galera cluster and a real 3-node NATS JetStream cluster.

They run on loopback addresses of the host (all of 127.0.0.0/8 is on lo), so they need no lab network; one test
runs a Galera node inside a real network namespace to prove that path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomysql
import nats
import pymysql.err
import pytest
from nats.js import JetStreamContext
from nats.js.api import PubAck

from helpers.capture import LoopbackCapture

from hapki.lab import tls
from hapki.lab.data import GaleraCluster, GaleraNode, NatsCluster, NatsClusterNode
from hapki.lab.local import BusUsers, TlsFiles

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

DB_ADDRESSES = ["127.0.1.21", "127.0.1.22", "127.0.1.23"]
NATS_ADDRESSES = ["127.0.1.31", "127.0.1.32", "127.0.1.33"]
NETNS = "hapki-test-data"


@pytest.fixture(scope="module")
def galera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GaleraCluster]:
    base = tmp_path_factory.mktemp("galera")
    nodes = [GaleraNode(base, f"db-{i}", address, DB_ADDRESSES) for i, address in enumerate(DB_ADDRESSES, 1)]
    # As in the lab: TLS for clients (required) and for replication, certificates from one infrastructure CA.
    tls.create_infra_ca(base / "tls")
    cluster = GaleraCluster(base, nodes, tls=lambda n: TlsFiles.issue(base / "tls", n.name, [n.address],
                                                                      client_auth=True))
    cluster.start()
    log.info("galera: 3 nodes Synced in %.1f s", cluster.started_in)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            cluster.kill()  # no-op after a clean stop


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    base = tmp_path_factory.mktemp("nats")
    routes = [f"{address}:6222" for address in NATS_ADDRESSES]
    nodes = [NatsClusterNode(base, f"nats-{i}", address, routes) for i, address in enumerate(NATS_ADDRESSES, 1)]
    # As in the lab: users with permissions, TLS for clients and mutual TLS between the routes.
    tls.create_infra_ca(base / "tls")
    users = BusUsers(base / "secrets")
    users.accounts_conf()
    cluster = NatsCluster(base, nodes, users=users, tls=lambda n: TlsFiles.issue(base / "tls", n.name, [n.address],
                                                                                 client_auth=True))
    cluster.start()
    log.info("nats: 3 nodes with a meta leader in %.1f s", cluster.started_in)
    try:
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------
# Galera
# ---------------------------------------------------------------------------------------------------------------


def test_galera_cluster_of_three_is_synced(galera: GaleraCluster) -> None:
    status = galera.status()
    assert set(status) == {"db-1", "db-2", "db-3"}
    for name, st in status.items():
        assert st["up"], name
        assert st["wsrep_cluster_size"] == 3, (name, st)
        assert st["wsrep_local_state_comment"] == "Synced", (name, st)
        assert st["wsrep_cluster_status"] == "Primary", (name, st)
        assert st["wsrep_ready"] == "ON", (name, st)
    # Joiners got their data by a full SST (they started empty); the bootstrap node by none.
    assert [n.joined_by() for n in galera.nodes] == [None, "SST", "SST"]


async def test_app_users_log_in_over_tcp_on_any_node(galera: GaleraCluster) -> None:
    for user, node in zip(GaleraCluster.users, galera.nodes[::-1]):
        path = galera.password_file(user)
        assert path.stat().st_mode & 0o777 == 0o600
        conn = await aiomysql.connect(host=node.address, port=node.port, user=user, password=galera.password(user),
                                      db="hapki", connect_timeout=5, ssl=_ssl(galera.base_dir))
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT CURRENT_USER()")
                assert await cur.fetchone() == (f"{user}@%",)
        finally:
            conn.close()
        with pytest.raises(pymysql.err.Error):  # without TLS: refused
            plain = await aiomysql.connect(host=node.address, port=node.port, user=user, db="hapki",
                                           password=galera.password(user), connect_timeout=5)
            plain.close()


def test_galera_replication_is_encrypted(galera: GaleraCluster) -> None:
    options = galera.nodes[0].sql("SELECT @@wsrep_provider_options")
    assert "socket.ssl = YES" in options, options
    status = galera.status()
    assert all(st["wsrep_cluster_size"] == 3 for st in status.values()), status


def _ssl(base: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(base / "tls" / "infra-ca.pem"))


def test_write_on_node_1_is_read_on_node_3(galera: GaleraCluster) -> None:
    first, _, third = galera.nodes
    first.sql("CREATE TABLE IF NOT EXISTS hapki.lab_rw (id INT PRIMARY KEY, v VARCHAR(20));"
              "REPLACE INTO hapki.lab_rw VALUES (1, 'from db-1');")
    # wsrep_sync_wait=1: the read waits until node 3 has applied everything committed before it (read-your-writes).
    assert third.sql("SET SESSION wsrep_sync_wait=1; SELECT v FROM hapki.lab_rw WHERE id=1").strip() == "from db-1"


def test_killed_node_rejoins_by_ist_at_its_recovered_position(galera: GaleraCluster) -> None:
    first, second, _ = galera.nodes
    first.sql("CREATE TABLE IF NOT EXISTS hapki.lab_crash (id INT PRIMARY KEY)")
    second.kill()
    assert second.status() == {"up": False}
    assert second.grastate()["seqno"] == -1  # a crash leaves no position in grastate.dat: --wsrep-recover finds it
    # The two survivors keep a Primary component and go on committing while db-2 is down.
    first.sql("INSERT INTO hapki.lab_crash VALUES " + ",".join(f"({i})" for i in range(1, 51)))

    began = time.monotonic()
    position = second.restart_after_crash()
    status = second.wait_synced(timeout=60)
    took = time.monotonic() - began
    log.info("galera: db-2 back (Synced) %.1f s after restart_after_crash() from %s", took, position)

    assert status["wsrep_cluster_size"] == 3
    assert second.joined_by() == "IST"  # only the missed writesets, from a donor's gcache; no full SST
    assert second.sql("SET SESSION wsrep_sync_wait=1; SELECT COUNT(*) FROM hapki.lab_crash").strip() == "50"


async def test_a_fenced_commit_rolled_back_by_the_cluster_in_its_round_trip_commits_nothing(
        galera: GaleraCluster) -> None:
    """Galera may roll a transaction back (brute-force abort: a replicated write set wins a lock it holds) in the
    middle of the fence's multi-statement round trip; MariaDB then ran the remaining statements in a new transaction
    and committed them with the round trip's COMMIT, reporting 1213 only after (codership/mysql-wsrep#191). The
    fault suite saw a batch's certificates committed without their intents, requests and audit entries. The commit
    guard (hapki.runtime.db: a savepoint set first, released before COMMIT) leaves nothing committed, and the body
    runs again: exactly one row, the retry's, not one from the aborted attempt besides."""
    from hapki.runtime.config import DatabaseConfig
    from hapki.runtime.db import Database, Fence, at_fence, before_fence

    first, second, _ = galera.nodes
    tag = secrets.token_hex(8)
    first.sql("CREATE TABLE IF NOT EXISTS hapki.bf_rows (id INT PRIMARY KEY, v INT NOT NULL);"
              " CREATE TABLE IF NOT EXISTS hapki.bf_log (id INT AUTO_INCREMENT PRIMARY KEY, tag VARCHAR(32));"
              " REPLACE INTO hapki.bf_rows VALUES (1, 0);"
              " REPLACE INTO hapki.epochs (tier, epoch, holder, fence_seq, updated_at)"
              " VALUES ('bf-test', 1, 'test', 0, NOW(6))")
    config = DatabaseConfig(nodes=[f"{first.address}:{first.port}"], user="hapki",
                            password_file=galera.password_file("hapki"), tls_ca_file=galera.base_dir / "tls" / "infra-ca.pem",
                            transaction_timeout_seconds=30)
    database = Database(config)
    attempts = 0

    async def body(cur: aiomysql.Cursor) -> None:
        nonlocal attempts
        attempts += 1
        before_fence("UPDATE bf_rows SET v = v + 1 WHERE id = 1")  # the lock the replicated write set takes away
        before_fence("DO SLEEP(%s)", (1.5 if attempts == 1 else 0,))
        at_fence("INSERT INTO bf_log (tag) VALUES (%s)", (tag,))

    async def conflicting_write() -> None:
        await asyncio.sleep(0.5)  # inside the first attempt's sleep, holding the row lock on db-1
        await asyncio.to_thread(second.sql, "UPDATE hapki.bf_rows SET v = 100 WHERE id = 1")

    try:
        await asyncio.gather(database.run(body, name="t.bf_abort", fence=Fence("bf-test", 1)), conflicting_write())
    finally:
        await database.close()
    assert attempts >= 2, "the cluster did not roll the first attempt back: the test proves nothing"
    rows = second.sql(f"SET SESSION wsrep_sync_wait=1; SELECT COUNT(*) FROM hapki.bf_log WHERE tag = '{tag}';"
                      " SELECT v FROM hapki.bf_rows WHERE id = 1").split()
    assert rows == ["1", "101"], f"rows committed with the tag, value: {rows} (an aborted attempt committed its rest)"


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root")
def test_wiped_node_rejoins_by_sst_over_tls(galera: GaleraCluster) -> None:
    """A full state transfer (rsync SST) of a wiped node runs through stunnel: TLS on the wire, no row in clear."""
    first, _, third = galera.nodes
    probe = b"hapki-sst-probe-" + secrets.token_hex(8).encode()
    # Rows that must cross: written before the SST and flushed into the table's .ibd on both possible donors (the
    # flush is local to a node), so rsync copies them as they are.
    first.sql("CREATE TABLE IF NOT EXISTS hapki.lab_sst (id INT PRIMARY KEY, v VARCHAR(64));"
              "INSERT INTO hapki.lab_sst VALUES " + ",".join(f"({i}, '{probe.decode()}')" for i in range(1, 201)))
    for node in galera.nodes[:2]:
        node.sql("SET SESSION wsrep_sync_wait=1; FLUSH TABLES hapki.lab_sst FOR EXPORT; UNLOCK TABLES;")
        assert probe in (node.datadir / "hapki" / "lab_sst.ibd").read_bytes(), node.name

    third.stop()
    shutil.rmtree(third.datadir)
    with LoopbackCapture(third.address, third.sst_port, [probe]) as wire:
        third.start(bootstrap=False)
        third.wait_synced(timeout=120)
    log.info("galera: SST to db-3 carried %d bytes on port %d (%s), kernel drops %d", wire.total, third.sst_port,
             {k: f.bytes for k, f in wire.flows.items()}, wire.drops)

    assert third.joined_by() == "SST"
    assert third.sql("SELECT COUNT(*) FROM hapki.lab_sst WHERE v = '%s'" % probe.decode()).strip() == "200"
    assert probe in (third.datadir / "hapki" / "lab_sst.ibd").read_bytes()  # it came over, in that file
    # The wire: every frame captured (no kernel drops), the bulk of the datadir crossed this port (all but the
    # joiner's own gcache), a TLS handshake first in both directions (content type 22, version 3.x), and the
    # probe rows in neither direction.
    assert wire.drops == 0
    assert wire.flows["to"].bytes > _datadir_bytes(third.datadir, but="galera.cache") // 2
    for direction, flow in wire.flows.items():
        assert flow.head[:2] == b"\x16\x03", (direction, bytes(flow.head[:16]))
        assert not flow.found, f"probe rows in clear on the SST link ({direction})"
    # And it was the stock script's stunnel, with the peer checks on.
    started = third.log_since_start()
    assert "Using stunnel for SSL encryption" in started and "ssl-mode='VERIFY_IDENTITY'" in started, started[-3000:]


def _datadir_bytes(datadir: Path, but: str) -> int:
    return sum(p.stat().st_size for p in datadir.rglob("*") if p.is_file() and p.name != but)


# ---------------------------------------------------------------------------------------------------------------
# NATS JetStream
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
async def js(nats_cluster: NatsCluster) -> AsyncIterator[JetStreamContext]:
    assert nats_cluster.users is not None
    nc = await nats.connect(servers=nats_cluster.urls, connect_timeout=5, reconnect_time_wait=0.2,
                            max_reconnect_attempts=-1, user="admin", tls=_ssl(nats_cluster.base_dir),
                            password=nats_cluster.users.password_file("admin").read_text().strip())
    try:
        yield nc.jetstream(timeout=5)
    finally:
        await nc.close()


async def _publish_until_acked(js: JetStreamContext, subject: str, data: bytes, timeout: float) -> tuple[PubAck, float]:
    """Publish until a PubAck arrives (the stream may be electing a leader); return it and the seconds it took."""
    began = time.monotonic()
    deadline = began + timeout
    while True:
        try:
            return await js.publish(subject, data, timeout=1), time.monotonic() - began
        except (TimeoutError, nats.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_nats_cluster_has_a_meta_leader_and_full_routes(nats_cluster: NatsCluster) -> None:
    status = nats_cluster.status()
    assert status["meta_leader"] in {"nats-1", "nats-2", "nats-3"}
    for name, st in status["nodes"].items():
        assert st["up"] and st["healthy"], (name, st)
        assert len(st["route_peers"]) == 2, (name, st)


async def test_r3_stream_keeps_accepting_publishes_when_its_leader_dies(
    nats_cluster: NatsCluster, js: JetStreamContext
) -> None:
    await js.add_stream(name="LABDATA", subjects=["labdata.>"], num_replicas=3)
    ack, _ = await _publish_until_acked(js, "labdata.one", b"1", timeout=10)
    assert (ack.stream, ack.seq) == ("LABDATA", 1)
    info = await js.stream_info("LABDATA")
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2

    leader = next(n for n in nats_cluster.nodes if n.name == info.cluster.leader)
    leader.kill()
    ack, pause = await _publish_until_acked(js, "labdata.two", b"2", timeout=20)
    log.info("nats: publishing resumed %.1f s after the stream leader %s was killed", pause, leader.name)
    assert (ack.stream, ack.seq) == ("LABDATA", 2)
    assert pause < 15, pause

    info = await js.stream_info("LABDATA")
    assert info.cluster is not None and info.cluster.leader not in (None, leader.name)
    assert info.state.messages == 2


# ---------------------------------------------------------------------------------------------------------------
# A node inside a network namespace
# ---------------------------------------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip(8)")
def test_galera_node_runs_inside_a_network_namespace(tmp_path: Path) -> None:
    # A namespace left by a killed run would make `ip netns add` fail.
    subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True, timeout=30, check=False)
    _ip("netns", "add", NETNS)
    node = GaleraNode(tmp_path, "db-ns", "127.0.0.1", ["127.0.0.1"], netns=NETNS)
    try:
        _ip("netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        node.start(bootstrap=True)
        status = node.wait_synced(timeout=60)
        assert status["wsrep_local_state_comment"] == "Synced"
        assert status["wsrep_cluster_size"] == 1
        # The server's 127.0.0.1:3306 is the namespace's own loopback, not the host's.
        pids = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True, check=True).stdout
        assert str(node.pid) in pids.split()
        assert node.sql("SELECT @@bind_address").strip() == "127.0.0.1"
    finally:
        try:
            node.stop()
        finally:
            _ip("netns", "delete", NETNS)
