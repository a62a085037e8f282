"""Least privilege and TLS in the lab (issue 6), against the 3-node NATS cluster and Galera as `hapki lab up` runs them."""

from __future__ import annotations

import aiomysql
import pymysql.err
import pytest

from bus_session import bus_session, plaintext_refused
from hapki.contracts import subjects
from hapki.lab.ha import Lab

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
