"""The bus: connecting to NATS and the one place that defines JetStream streams and consumers.

Services bind to these objects; they never declare them with their own settings (FIELD-NOTES: FastStream
re-declares streams silently, and an existing durable consumer keeps its config).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from hapki.contracts import subjects
from hapki.contracts.limits import MAX_SIGNING_REQUEST_BYTES
from hapki.runtime import bus_auth
from hapki.runtime.config import NatsConfig, read_secret
from hapki.runtime.tasks import cancel_and_wait

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


def round_robin(servers: list[str]) -> dict[str, Any]:
    """nats.connect() keywords: the servers in a random order (clients spread over the cluster), then tried in turn.

    nats-py shuffles its server list at every reconnection by default: a client moved off a server cut off from
    the cluster (QuorumWatchdog, `Client.force_reconnect`) went back to it one time in three. In turn, the next
    server is always another one.
    """
    return {"servers": random.sample(servers, len(servers)), "dont_randomize": True}


async def connect(config: NatsConfig, *, name: str, stream: str | None = None) -> Client:
    """Connect to the NATS cluster, reconnecting forever (the bus is clustered; members come back); with
    ``stream`` (the one the service works with), watch that the server it is on can store into it
    (QuorumWatchdog; `close()` stops the watch)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    nc = await nats.connect(
        **round_robin(config.servers),
        name=name,
        connect_timeout=config.connect_timeout_seconds,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **connect_options(config),
    )
    if stream is not None:
        watch(nc, config, name=name, stream=stream)
    return nc


# --- a server cut off from the cluster ------------------------------------------------------------------------

# A stream's leader hears from each replica about every second (Raft heartbeats); one it has not heard from for
# this long is not with it. Cut off from the others, it stays the leader for 10-20 s, and answers as one.
REPLICA_SILENT_SECONDS = 3.0
# Consecutive failed probes before moving to another server. Only a leader whose replicas are all silent is sure
# to be cut off. No answer, no leader, JetStream unavailable: what a server cut off from the stream's leader says
# for as long as the partition lasts, but also what every server of the majority says while it elects a new
# leader (up to 9 s, nats-server's election timeout; a watchdog that moved then took CARA from a good server to the
# cut-off one). So those count to a longer streak. And the least time between two moves.
WATCHDOG_FAILURES = 3
WATCHDOG_UNSURE_FAILURES = 15
WATCHDOG_MIN_GAP_SECONDS = 10.0


class StreamProblem(NamedTuple):
    """Why a stream cannot store through a server; `cut_off`: only a server cut off from the cluster says this."""

    reason: str
    cut_off: bool = False


async def stream_quorum_problem(nc: Client, stream: str, timeout: float) -> StreamProblem | None:
    """Whether ``stream`` can store messages through the server ``nc`` is on: None when it can, else why not.

    Asks for the stream's information (`$JS.API.STREAM.INFO.<stream>`, which every service may ask for its own
    streams): answered by the stream's leader, through the routes. A server cut off from the others either gets no
    answer (the leader is on the other side) or is the leader itself and answers, with every replica silent.
    """
    try:
        msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        return StreamProblem("no JetStream responder")
    except nats.errors.TimeoutError:
        return StreamProblem(f"no answer within {timeout:g} s")
    try:
        info = json.loads(msg.data)
        error, cluster = info.get("error"), info.get("cluster") or {}
        replicas = [r.get("active") for r in cluster.get("replicas") or []]
    except (ValueError, AttributeError):
        return StreamProblem(f"an unreadable answer ({msg.data[:80]!r})")
    if error:
        return StreamProblem(f"error {error.get('code')} {error.get('description')}")
    if not cluster.get("leader"):
        return StreamProblem(f"{stream} has no leader")
    heard = [active / 1e9 for active in replicas if isinstance(active, int | float)]
    if replicas and not any(seconds < REPLICA_SILENT_SECONDS for seconds in heard):
        return StreamProblem(f"{stream}'s leader {cluster['leader']} has heard from none of its replicas for "
                             f"{min(heard, default=float('inf')):.1f} s", cut_off=True)
    return None


# Each watched connection's watchdog and the task running it, until `unwatch` (`close`) removes them.
_watchdogs: dict[Client, tuple[QuorumWatchdog, asyncio.Task[None]]] = {}


class QuorumWatchdog:
    """Moves a client off a NATS server that lost the cluster (docs/RELIABILITY.md, "The bus partitioned").

    A server cut off from the other two stays alive and keeps its clients: their connections are fine (the
    pings are answered), yet every JetStream call fails: no publish is stored, no fetch delivers, for as long as
    the partition lasts. nats-py reconnects only when a connection breaks. Every `probe_seconds` this checks that
    the service's stream can store through that server (`stream_quorum_problem`); after `failures` failed probes
    in a row that show it cut off (`unsure_failures` of those that may also be an election) it makes the client
    reconnect to the next server of its list (`Client.force_reconnect`, subscriptions carried over; the list is
    tried in turn, `round_robin`), at most once per `min_gap_seconds`.
    """

    def __init__(self, nc: Client, name: str, stream: str, *, probe_seconds: float, failures: int = WATCHDOG_FAILURES,
                 unsure_failures: int = WATCHDOG_UNSURE_FAILURES, min_gap_seconds: float = WATCHDOG_MIN_GAP_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nc = nc
        self.name = name
        self.stream = stream
        self.probe_seconds = probe_seconds
        self.threshold = failures
        self.unsure_threshold = unsure_failures
        self.min_gap_seconds = min_gap_seconds
        self.clock = clock
        self.failures = 0
        self.moves = 0
        self._last_move: float | None = None

    async def probe(self) -> StreamProblem | None:
        """None when the connection's server can store into the watched stream; otherwise why not."""
        return await stream_quorum_problem(self.nc, self.stream, self.probe_seconds)

    async def check(self) -> bool:
        """One probe; True when it moved the client to another server."""
        if not self.nc.is_connected:
            self.failures = 0  # reconnecting by itself already
            return False
        try:
            why = await self.probe()
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.ConnectionDrainingError):
            self.failures = 0
            return False
        server = self.nc.connected_url.netloc if self.nc.connected_url else "?"
        if why is None:
            if self.failures:
                log.info("bus: %s stores into %s again (%s)", server, self.stream, self.name)
            self.failures = 0
            return False
        self.failures += 1
        now = self.clock()
        threshold = self.threshold if why.cut_off else self.unsure_threshold
        if self.failures < threshold or (
                self._last_move is not None and now - self._last_move < self.min_gap_seconds):
            log.log(logging.INFO if self.failures == 1 else logging.DEBUG,
                    "bus: probe %d of %s on %s failed (%s): %s", self.failures, self.stream, server, self.name,
                    why.reason)
            return False
        log.warning("bus: %s has failed %d probes of %s in a row (%s; last: %s): moving to another server",
                    server, self.failures, self.stream, self.name, why.reason)
        self.failures = 0
        self._last_move = now
        self.moves += 1
        await self.nc.force_reconnect()
        return True

    async def run(self) -> None:
        """Probe every `probe_seconds`, start to start: a probe that waits out its timeout is followed by the next
        at once, so a server cut off is left about `failures` x `probe_seconds` after the cut."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.probe_seconds
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + self.probe_seconds
            try:
                await self.check()
            except nats.errors.Error as exc:  # a probe the client refused; the next one may not be
                log.warning("bus: JetStream probe not sent (%s): %s: %s", self.name, type(exc).__name__, exc)


def watch(nc: Client, config: NatsConfig, *, name: str, stream: str) -> None:
    """Start a QuorumWatchdog of ``stream`` on ``nc`` (a connection of a service, e.g. FastStream's) when the bus
    is a cluster; `unwatch` (or `close`) stops it."""
    if len(config.servers) < 2 or not config.quorum_probe_seconds or nc in _watchdogs:
        return
    dog = QuorumWatchdog(nc, name, stream, probe_seconds=config.quorum_probe_seconds)
    _watchdogs[nc] = (dog, asyncio.get_running_loop().create_task(dog.run(), name=f"bus-watchdog-{name}"))


def watchdog_of(nc: Client) -> QuorumWatchdog | None:
    entry = _watchdogs.get(nc)
    return entry[0] if entry else None


async def unwatch(nc: Client) -> None:
    entry = _watchdogs.pop(nc, None)
    if entry is not None:
        await cancel_and_wait(entry[1])


CLOSE_TIMEOUT_SECONDS = 5.0


async def close(nc: Client, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
    """Close a service's bus connection at stop, bounded, and never fail the stop for it.

    A connection that died just before (the bus node killed or cut off while the service had writes pending)
    makes nats-py's close() raise ConnectionResetError from its last flush: the service's stop then crashed with a
    traceback and never closed its HSM sessions and database pools. Logged instead; nothing is left to close.
    """
    await unwatch(nc)
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
