"""The one definition of streams and consumers: created when missing, and an existing consumer converges to it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import nats
import pytest

from hapki.contracts import subjects
from hapki.lab import stack
from hapki.lab.local import NatsServer, TlsFiles
from hapki.runtime import bus, telemetry

pytestmark = pytest.mark.integration


async def test_an_existing_consumer_with_an_old_ack_wait_is_updated(env) -> None:
    nc = await nats.connect(**env.nats.connect_kwargs())
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, stack.nats_config(env))
        old = bus.signing_consumer()
        old.ack_wait = 30.0  # what an earlier release deployed
        await js.add_consumer(subjects.SIGNING_STREAM, old)
        assert (await js.consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER)).config.ack_wait == 30.0
        await bus.ensure_topology(js, stack.nats_config(env))
        info = await js.consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER)
        assert info.config.ack_wait == bus.SIGNING_ACK_WAIT_SECONDS
        assert (await js.stream_info(subjects.HA_EVENTS_STREAM)).config.name == subjects.HA_EVENTS_STREAM
    finally:
        await nc.close()


async def test_a_service_stops_cleanly_when_its_bus_server_was_just_killed(tmp_path: Path) -> None:
    """nats-py's close() raises ConnectionResetError when the server died under writes still pending (a bus node
    killed during a service's stop, as `hapki lab down` can do): the stop crashed there, before closing the HSM
    sessions and the database pools. bus.close logs it and returns."""
    server = NatsServer(tmp_path)
    server.start()
    try:
        nc = await bus.connect(server.nats_config("cara"), name="test-close")
        await nc.flush()
        server.kill()
        await asyncio.sleep(0.05)
        for _ in range(100):
            await nc.publish(subjects.CARA_FAILED, b"x" * 2000)  # pending when the connection is found dead
        await bus.close(nc)
        assert nc.is_closed
    finally:
        server.stop()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_a_bus_connection_over_tls_ends_without_asyncio_s_eof_warning(tmp_path: Path) -> None:
    """nats-py upgrades its connection to TLS with a protocol that never learns it runs over TLS
    (nats-io/nats.py#574), so asyncio warned "returning true from eof_received() ..." whenever a connection ended:
    in every service's log at each stop and failover. The services' logging drops that message, and only it."""
    server = NatsServer(tmp_path)
    server.tls = TlsFiles.issue(tmp_path / "tls", "nats", ["127.0.0.1"])
    server.start()
    asyncio_log, root = logging.getLogger("asyncio"), logging.getLogger()
    saved_handlers, saved_level, saved_filters = root.handlers[:], root.level, asyncio_log.filters[:]
    # Whatever an earlier test's setup_logging installed goes for the first half (restored after).
    asyncio_log.filters[:] = [f for f in saved_filters if not isinstance(f, telemetry.AsyncioTlsEofNoise)]
    seen = _Collect()
    asyncio_log.addHandler(seen)

    async def connect_and_close() -> None:
        nc = await nats.connect(**server.connect_kwargs("admin"), allow_reconnect=False)
        await nc.flush()
        await nc.close()

    try:
        # Without the services' logging: the library still warns (else this test would prove nothing).
        await connect_and_close()
        for _ in range(40):
            if telemetry.ASYNCIO_TLS_EOF_NOISE in seen.messages:
                break
            await asyncio.sleep(0.05)
        # Only these two messages are looked at: other asyncio messages of the process (a transport of an earlier
        # test collected now) may come and go.
        assert seen.messages.count(telemetry.ASYNCIO_TLS_EOF_NOISE) == 1
        seen.messages.clear()
        telemetry.setup_logging()
        await connect_and_close()
        await asyncio.sleep(0.5)
        asyncio_log.warning("another asyncio warning")
        assert telemetry.ASYNCIO_TLS_EOF_NOISE not in seen.messages
        assert "another asyncio warning" in seen.messages
    finally:
        asyncio_log.removeHandler(seen)
        asyncio_log.filters[:] = saved_filters
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        server.stop()


async def test_a_delivery_no_fetch_took_is_found_in_the_pull_subscription(tmp_path: Path) -> None:
    """hapki.cara.signer.undelivered against the real client and server: a fetch cancelled while its pull request
    is open (a signer stopping) leaves that request on the server, the next message goes to it and waits in
    nats-py's queue. The signer takes it from there and NAKs it instead of dropping it with the subscription."""
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    from hapki.cara.signer import undelivered

    server = NatsServer(tmp_path)
    server.start()
    try:
        nc = await nats.connect(**server.connect_kwargs())
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="T", subjects=["t.x"]))
        await js.add_consumer("T", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=30))
        psub = await js.pull_subscribe_bind(durable="c", stream="T")
        fetch = asyncio.ensure_future(psub.fetch(1, timeout=5))
        await asyncio.sleep(0.3)  # nothing to fetch: the client's long-poll pull request is open on the server
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        await js.publish("t.x", b"late")
        for _ in range(200):
            if psub.pending_msgs:
                break
            await asyncio.sleep(0.01)
        late = undelivered(psub)
        assert [m.data for m in late] == [b"late"] and psub.pending_msgs == 0
        await late[0].nak()  # handed back: delivered again at once, not after ack_wait (30 s here)
        again = await psub.fetch(1, timeout=5)
        assert [m.data for m in again] == [b"late"] and again[0].metadata.num_delivered == 2
        await nc.close()
    finally:
        server.stop()
