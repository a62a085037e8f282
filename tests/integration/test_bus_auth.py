"""Bus authorization and TLS on a real nats-server (issue 6): each user reaches exactly its subjects.

The permission table is hapki.runtime.bus_auth; LocalEnv runs the server with it, TLS on, as the lab does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiomysql
import bcrypt
import nats
import nats.errors
import pymysql.err
import pytest

from bus_session import BusSession, bus_session, plaintext_refused
from hapki.contracts import subjects
from hapki.lab.local import BusUsers, LocalEnv
from hapki.runtime.bus_auth import BCRYPT_COST

pytestmark = pytest.mark.integration


def _as(env: LocalEnv, user: str) -> contextlib.AbstractAsyncContextManager[BusSession]:
    return bus_session(env.nats.connect_kwargs(user))


async def _signing_messages(env: LocalEnv) -> int:
    async with _as(env, "admin") as admin:
        return (await admin.nc.jetstream().stream_info(subjects.SIGNING_STREAM)).state.messages


async def test_a_client_cannot_publish_signing_requests(env: LocalEnv) -> None:
    before = await _signing_messages(env)
    async with _as(env, "client") as client:
        await client.nc.publish(subjects.CARA_SIGN, b'{"forged": true}')
        await client.violation(f'Publish to "{subjects.CARA_SIGN}"')
        # Nor through the JetStream API: no consumer on the signing stream, no direct access.
        await client.nc.publish(f"$JS.API.CONSUMER.CREATE.{subjects.SIGNING_STREAM}", b"{}")
        await client.violation("$JS.API.CONSUMER.CREATE")
    assert await _signing_messages(env) == before


async def test_a_client_cannot_read_results_or_other_requesters_replies(env: LocalEnv) -> None:
    async with _as(env, "client") as client:
        for subject in (subjects.CARA_ISSUED, subjects.CARA_FAILED, "_INBOX.>", "_INBOX.client-b.>",
                        "_INBOX.clm.>", subjects.CARA_SIGN, ">"):
            await client.nc.subscribe(subject)
            await client.violation(f'Subscription to "{subject}"')
        # Its own inbox works: that is where its replies land.
        await client.nc.subscribe("_INBOX.client.x")
        await client.nc.flush()
        assert not any("_INBOX.client.x" in e for e in client.errors)


async def test_only_watchers_publish_ha_events(env: LocalEnv) -> None:
    subject = subjects.ha_events("cara", "cara-1")
    for user in ("client", "clm", "cara"):
        async with _as(env, user) as session:
            await session.nc.publish(subject, b"{}")
            await session.violation(f'Publish to "{subject}"')
    async with _as(env, "watcher-cara-1") as watcher:
        ack = await watcher.nc.jetstream().publish(subject, b'{"test": true}', timeout=5)
        assert ack.stream == subjects.HA_EVENTS_STREAM
        # A member's watcher speaks for that member only.
        other = subjects.ha_events("cara", "cara-2")
        await watcher.nc.publish(other, b"{}")
        await watcher.violation(f'Publish to "{other}"')


async def test_only_the_signer_reaches_the_signing_stream(env: LocalEnv) -> None:
    consumer = f"{subjects.SIGNING_STREAM}.{subjects.SIGNING_CONSUMER}"
    async with _as(env, "clm") as clm:
        # CLM publishes signing requests but cannot read them back, nor manage the stream.
        await clm.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{consumer}", b"1")
        await clm.violation("$JS.API.CONSUMER.MSG.NEXT")
        await clm.nc.publish(f"$JS.API.STREAM.PURGE.{subjects.SIGNING_STREAM}", b"")
        await clm.violation("$JS.API.STREAM.PURGE")
        await clm.nc.subscribe(subjects.CARA_SIGN)
        await clm.violation(f'Subscription to "{subjects.CARA_SIGN}"')
    async with _as(env, "watcher") as watcher:
        await watcher.nc.publish(subjects.CARA_SIGN, b"{}")
        await watcher.violation(f'Publish to "{subjects.CARA_SIGN}"')
    async with _as(env, "cara") as cara:
        # The signer may look its consumer up, but not delete streams or publish signing requests itself.
        info = await cara.nc.jetstream().consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER)
        assert info.name == subjects.SIGNING_CONSUMER
        await cara.nc.publish(subjects.CARA_SIGN, b"{}")
        await cara.violation(f'Publish to "{subjects.CARA_SIGN}"')
        await cara.nc.publish(f"$JS.API.STREAM.DELETE.{subjects.SIGNING_STREAM}", b"")
        await cara.violation("$JS.API.STREAM.DELETE")


async def test_connections_without_credentials_or_tls_are_refused(env: LocalEnv) -> None:
    kwargs = env.nats.connect_kwargs("client")
    info = await plaintext_refused("127.0.0.1", env.nats.port, "client", str(kwargs["password"]))
    assert info["tls_required"] is True and info["auth_required"] is True
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):  # TLS but no credentials
        await nats.connect(servers=kwargs["servers"], tls=kwargs["tls"], connect_timeout=2, allow_reconnect=False,
                           max_reconnect_attempts=0)
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):  # a wrong password
        await nats.connect(servers=kwargs["servers"], tls=kwargs["tls"], user="client", password="guess",
                           connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)


async def test_the_server_config_holds_bcrypt_hashes_and_every_user_still_connects(env: LocalEnv) -> None:
    conf = env.nats.conf_path.read_text()
    body = json.loads(conf[conf.index("accounts: ") + len("accounts: "):conf.index("\n}\n") + 2])
    hashes = {u["user"]: u["password"] for account in body.values() for u in account["users"]}
    assert set(hashes) == {name for name, *_ in BusUsers.DEFAULT}
    for user, hashed in hashes.items():
        password = env.nats.users.password_file(user).read_text().strip()
        assert password not in conf, f"{user}'s password in clear in {env.nats.conf_path}"
        assert hashed.startswith(f"$2a${BCRYPT_COST:02d}$") and bcrypt.checkpw(password.encode(), hashed.encode()), user
        # The server checks the plaintext from the user's 0600 file against the hash: the user connects.
        async with _as(env, user) as session:
            await session.nc.flush(timeout=5)
    # What the config holds is no password: presented as one, the hash is refused.
    kwargs = env.nats.connect_kwargs("client")
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await nats.connect(servers=kwargs["servers"], tls=kwargs["tls"], user="client", password=hashes["client"],
                           connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)


async def test_database_connections_without_tls_are_refused(env: LocalEnv) -> None:
    kwargs = env.db.connect_kwargs("hapki_clm")
    assert "ssl" in kwargs
    kwargs.pop("ssl")
    with pytest.raises(pymysql.err.Error):
        conn = await aiomysql.connect(**kwargs, connect_timeout=5)
        conn.close()
    # With TLS it works, and the session really is encrypted.
    conn = await aiomysql.connect(**env.db.connect_kwargs("hapki_clm"), connect_timeout=5)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            row = await cur.fetchone()
            assert row is not None and row[1]
    finally:
        conn.close()
