"""The bus: connecting to NATS and the one place that defines JetStream streams and consumers.

Services bind to these objects; they never declare them with their own settings (FIELD-NOTES: FastStream
re-declares streams silently, and an existing durable consumer keeps its config).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from hapki.contracts import subjects
from hapki.contracts.limits import MAX_SIGNING_REQUEST_BYTES
from hapki.runtime import bus_auth
from hapki.runtime.config import NatsConfig, read_secret

log = logging.getLogger("hapki.bus")

# Redeliver an unacked signing request after this long. Short, because a crashed signer's messages wait
# exactly this long (FIELD-NOTES), and a CARA crash costs clients max(failover ~0.35 s, ack_wait); signings
# taking longer heartbeat with in_progress() every 0.1 s. A redelivery racing the original is harmless: the
# outcome check and the unique keys make the second copy an abandoned intent at worst.
SIGNING_ACK_WAIT_SECONDS = 0.5
# JetStream de-duplicates a republished request id within this window; CARA's database checks cover the rest.
DUPLICATE_WINDOW_SECONDS = 600.0


def signing_stream(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=subjects.SIGNING_STREAM,
        subjects=[subjects.CARA_SIGN],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        max_msg_size=MAX_SIGNING_REQUEST_BYTES,
        max_age=7 * 86400.0,
    )


def ha_events_stream(replicas: int) -> StreamConfig:
    """Failover history: every watcher's role changes, kept for a month."""
    return StreamConfig(
        name=subjects.HA_EVENTS_STREAM,
        subjects=[f"{subjects.HA_EVENTS_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=30 * 86400.0,
        max_msgs=100_000,
    )


def expiry_stream(replicas: int) -> StreamConfig:
    """CLM's expiry notices: one message per certificate per window (Nats-Msg-Id de-duplicates a republish)."""
    return StreamConfig(
        name=subjects.EXPIRY_STREAM,
        subjects=[subjects.CLM_EXPIRING],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        max_age=90 * 86400.0,
    )


_UPDATABLE = ("ack_wait", "max_ack_pending", "max_waiting", "max_deliver")


def signing_consumer() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.SIGNING_CONSUMER,
        filter_subject=subjects.CARA_SIGN,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=SIGNING_ACK_WAIT_SECONDS,
        max_deliver=-1,
        max_ack_pending=2048,
        max_waiting=512,
    )


def tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    """A client TLS context verifying the servers against config.tls_ca_file (None: plaintext)."""
    if config.tls_ca_file is None:
        return None
    context = ssl.create_default_context(cafile=str(config.tls_ca_file))
    if config.tls_cert_file is not None:
        context.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file) if config.tls_key_file else None)
    return context


def connect_options(config: NatsConfig) -> dict[str, Any]:
    """nats.connect() keywords for credentials, TLS and the user's own inbox prefix (secrets read here)."""
    options: dict[str, Any] = {}
    if config.user is not None:
        options["user"] = config.user
        options["password"] = read_secret(config.password_file) if config.password_file else None
        options["inbox_prefix"] = bus_auth.inbox_prefix(config.user)
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
    return options


def faststream_options(config: NatsConfig) -> dict[str, Any]:
    """The same for a FastStream NatsBroker (credentials and TLS go through its `security` object)."""
    # Imported here: only CLM runs a FastStream broker, and importing FastStream costs a CARA process (or a signer
    # worker) about 80 ms of every start, i.e. of every restart after a crash.
    from faststream.nats.security import NatsSecurity, NatsUserPassword

    options = connect_options(config)
    out: dict[str, Any] = {}
    if "inbox_prefix" in options:
        out["inbox_prefix"] = options["inbox_prefix"]
    if "user" in options:
        out["security"] = NatsUserPassword(username=options["user"], password=options["password"] or "",
                                           ssl_context=options.get("tls"))
    elif "tls" in options:
        out["security"] = NatsSecurity(ssl_context=options["tls"])
    return out


async def connect(config: NatsConfig, *, name: str) -> Client:
    """Connect to the NATS cluster, reconnecting forever (the bus is clustered; members come back)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    return await nats.connect(
        servers=config.servers,
        name=name,
        connect_timeout=config.connect_timeout_seconds,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **connect_options(config),
    )


CLOSE_TIMEOUT_SECONDS = 5.0


async def close(nc: Client, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
    """Close a service's bus connection at stop, bounded, and never fail the stop for it.

    A connection that died just before (the bus node killed or cut off while the service had writes pending)
    makes nats-py's close() raise ConnectionResetError from its last flush: the service's stop then crashed with a
    traceback and never closed its HSM sessions and database pools. Logged instead; nothing is left to close.
    """
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except (ConnectionError, OSError, TimeoutError) as exc:
        log.warning("bus connection not closed cleanly at stop (%s: %s)", type(exc).__name__, exc)


async def ensure_topology(js: JetStreamContext, config: NatsConfig, *, consumer: bool = True,
                          streams: tuple[str, ...] | None = None) -> None:
    """Create the streams and the signing consumer when missing; leave existing ones as they are, but say so.

    Provisioning runs this as the bus admin. Services run it too, but their bus users (hapki.runtime.bus_auth) may
    only look streams up: on a provisioned bus that is all it does. Only the CARA signer touches the signing
    consumer (`consumer`); CLM and the watchers pass False. `streams`: only these (default: all).
    """
    wanted = signing_stream(config.stream_replicas)
    if streams is None or wanted.name in streams:
        await _ensure_signing_stream(js, wanted)
    for stream in (ha_events_stream(config.stream_replicas), expiry_stream(config.stream_replicas)):
        if streams is not None and stream.name not in streams:
            continue
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(stream)
            log.info("created stream %s (replicas=%d)", stream.name, stream.num_replicas)
    if consumer:
        await _ensure_signing_consumer(js, wanted)


async def _ensure_signing_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    try:
        info = await js.stream_info(wanted.name)
        if info.config.retention != RetentionPolicy.WORK_QUEUE or info.config.subjects != wanted.subjects:
            log.warning("stream %s differs from its definition: %s", wanted.name, info.config)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("created stream %s (replicas=%d)", wanted.name, wanted.num_replicas)


async def _ensure_signing_consumer(js: JetStreamContext, wanted: StreamConfig) -> None:
    durable = signing_consumer()
    try:
        info = await js.consumer_info(wanted.name, subjects.SIGNING_CONSUMER)
    except NotFoundError:
        await js.add_consumer(wanted.name, durable)
        log.info("created consumer %s", subjects.SIGNING_CONSUMER)
        return
    # An existing durable keeps its config unless told otherwise (FIELD-NOTES): converge the settings the server
    # lets us change, so a deployment picks up a new ack_wait without deleting the consumer (and its state).
    drift = {f: (getattr(info.config, f), getattr(durable, f)) for f in _UPDATABLE
             if getattr(info.config, f) != getattr(durable, f)}
    if drift:
        await js.add_consumer(wanted.name, durable)
        log.info("updated consumer %s: %s", subjects.SIGNING_CONSUMER, drift)
