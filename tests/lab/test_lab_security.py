"""Least privilege and TLS in the lab (issue 6), against the 3-node NATS cluster and Galera as `hapki lab up` runs them."""

from __future__ import annotations

import asyncio
import os

import aiomysql
import nats
import pymysql.err
import pytest

from bus_session import bus_session, plaintext_refused
from hapki.contracts import subjects
from hapki.lab.ha import Lab
from hapki.lab.load import connect_db
from hapki.runtime.bus import SIGNING_ACK_WAIT_SECONDS
from helpers.signing import audit_entries, publish_signing_request, rows, signing_content

pytestmark = pytest.mark.lab


async def test_a_client_reaches_only_the_clm_api(lab: Lab) -> None:
    async with bus_session(lab.nats_connect_kwargs("client")) as client:
        await client.nc.publish(subjects.CARA_SIGN, b'{"forged": true}')
        await client.violation(f'Publish to "{subjects.CARA_SIGN}"')
        event = subjects.ha_events("cara", "cara-1")
        await client.nc.publish(event, b"{}")
        await client.violation(f'Publish to "{event}"')
        for subject in (subjects.CARA_ISSUED, "_INBOX.>", "_INBOX.clm.>", "_INBOX.client-b.>"):
            await client.nc.subscribe(subject)
            await client.violation(f'Subscription to "{subject}"')


async def test_clm_database_user_cannot_insert_a_certificate(lab: Lab) -> None:
    node = lab.galera.nodes[0]
    conn = await aiomysql.connect(host=node.address, port=node.port, user="hapki_clm", db="hapki",
                                  password=lab.galera.password("hapki_clm"), ssl=lab.db_ssl_context(), autocommit=True)
    try:
        async with conn.cursor() as cur:
            with pytest.raises(pymysql.err.Error) as info:
                await cur.execute("INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem,"
                                  " not_before, not_after, created_at) VALUES ('x', '01', 'r', 'i', 1, 'p', NOW(),"
                                  " NOW(), NOW())")
            assert info.value.args[0] == 1142
    finally:
        conn.close()


async def test_connections_without_tls_are_refused(lab: Lab) -> None:
    node = lab.nats.nodes[0]
    password = lab.bus_users.password_file("client").read_text().strip()
    info = await plaintext_refused(node.address, node.client_port, "client", password)
    assert info["tls_required"] is True
    db = lab.galera.nodes[0]
    with pytest.raises(pymysql.err.Error):
        conn = await aiomysql.connect(host=db.address, port=db.port, user="hapki_clm", db="hapki",
                                      password=lab.galera.password("hapki_clm"), connect_timeout=5)
        conn.close()
    status = lab.status()
    assert status["client"]["nats_user"] == "client" and status["client"]["ca_bundle"]


async def test_a_forged_signing_request_with_stolen_clm_credentials_is_refused_and_audited(lab: Lab) -> None:
    """Whoever holds CLM's bus password may publish into the signing stream, but without CLM's approval signature
    the CA signs nothing: the message is refused, audited and gone, nothing reserved or issued for it."""
    # CLM's own bus user, password from the lab's secrets: what an attacker who stole them from a CLM host holds.
    stolen = lab.nats_connect_kwargs("clm")
    assert stolen["user"] == "clm"
    forged = signing_content(["forged.example.com"])  # what CLM would approve, but unsigned
    assert forged.approval is None
    nc = await nats.connect(**stolen, connect_timeout=5)
    conn = await connect_db(lab)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION wsrep_sync_wait = 1")  # read what CARA committed on any node
        await publish_signing_request(nc, forged)  # accepted by the stream: CLM may publish there
        [entry] = await audit_entries(conn, forged.request_id, "signing.refused", timeout=20)
        assert entry["code"] == "APPROVAL_INVALID", entry
        assert entry["stored_request"] == "absent" and entry["names"] == ["forged.example.com"], entry
        # Longer than ack_wait: a message CARA had not terminated would have come back (and be refused again).
        await asyncio.sleep(SIGNING_ACK_WAIT_SECONDS + 1.0)
        for table in ("signing_intents", "certificates", "requests"):
            column = "id" if table == "requests" else "request_id"
            assert await rows(conn, f"SELECT 1 FROM {table} WHERE {column} = %s", (forged.request_id,)) == [], table
        audited = await rows(conn, "SELECT kind FROM audit_entries WHERE request_id = %s", (forged.request_id,))
        assert audited == [("signing.refused",)]
    finally:
        conn.close()
        await nc.close()


def test_a_wiped_galera_node_rejoins_by_state_transfer_over_tls(lab: Lab) -> None:
    """The namespaced lab's rsync SST runs through stunnel with the peer checks on (the loopback cluster test,
    tests/integration/test_lab_data.py, also captures the wire): a wiped node joins by SST, the donor's stunnel
    accepts the joiner's certificate by its node name, and the data arrives."""
    node = lab.galera.nodes[-1]
    marker = f"sst-{node.name}-{os.getpid()}"
    lab.galera.nodes[0].sql(f"CREATE TABLE IF NOT EXISTS hapki.lab_sst (v VARCHAR(64) PRIMARY KEY);"
                            f"INSERT INTO hapki.lab_sst VALUES ('{marker}')")
    lab.rebuild_galera_node(node.name)
    assert node.joined_by() == "SST"
    started = node.log_since_start()
    assert "Using stunnel for SSL encryption" in started and "ssl-mode='VERIFY_IDENTITY'" in started, started[-3000:]
    assert node.sql(f"SELECT COUNT(*) FROM hapki.lab_sst WHERE v = '{marker}'").strip() == "1"
    donors = "".join(n.log_path.read_text(errors="replace") for n in lab.galera.nodes if n is not node)
    assert "Subject checks failed" not in donors
