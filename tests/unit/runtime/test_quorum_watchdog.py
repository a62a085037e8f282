"""hapki.runtime.bus.QuorumWatchdog: a client whose NATS server can no longer store into the service's stream (cut
off from the cluster) is moved to another server after a few failed probes in a row, not after one, and not again
and again while every server fails (an election). The real partition: tests/integration/test_bus_partition.py."""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import urlparse

import nats.errors
import pytest

from hapki.runtime.bus import QuorumWatchdog, StreamProblem, stream_quorum_problem
from hapki.runtime.config import NatsConfig

STREAM = "PKI_SIGNING"
SUBJECT = f"$JS.API.STREAM.INFO.{STREAM}"


def info(leader: str | None, *silent_seconds: float) -> bytes:
    """A stream information answer: its leader and how long ago it heard from each replica."""
    replicas = [{"name": f"nats-{i}", "current": s < 1, "active": int(s * 1e9)}
                for i, s in enumerate(silent_seconds, 2)]
    return json.dumps({"type": "io.nats.jetstream.api.v1.stream_info_response", "config": {"name": STREAM},
                       "cluster": {"name": "hapki", "leader": leader, "replicas": replicas}}).encode()


OK = info("nats-1", 0.4, 0.9)
UNAVAILABLE = json.dumps({"error": {"code": 503, "err_code": 10008,
                                    "description": "JetStream system temporarily unavailable"}}).encode()


class FakeClient:
    """What the watchdog uses of nats-py's Client; each probe's answer is the next of `answers`."""

    def __init__(self, answers: list[bytes | Exception]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.is_connected = True
        self.connected_url = urlparse("tls://127.0.1.31:4222")
        self.reconnects = 0

    async def request(self, subject: str, payload: bytes, timeout: float) -> SimpleNamespace:
        self.asked.append(subject)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(data=answer)

    async def force_reconnect(self) -> None:
        self.reconnects += 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def probes(dog: QuorumWatchdog, clock: Clock, count: int, step: float = 1.0) -> list[bool]:
    moved = []
    for _ in range(count):
        clock.now += step
        moved.append(await dog.check())
    return moved


CUT_OFF = info("nats-1", 4.0, 4.1)  # the stream's leader, cut off: it answers, every replica silent
UNSURE = nats.errors.TimeoutError()  # cut off from the leader, or the majority electing one


@pytest.mark.parametrize(("answer", "problem"), [
    (OK, None),
    (info("nats-1", 0.2, 5.0), None),  # one replica with the leader: a quorum of three
    (info("nats-1"), None),  # one replica only (R1): nothing to hear from
    (CUT_OFF, StreamProblem("PKI_SIGNING's leader nats-1 has heard from none of its replicas for 4.0 s", cut_off=True)),
    # What a server cut off from the leader says, and the majority too while it elects a new one.
    (nats.errors.TimeoutError(), StreamProblem("no answer within 1 s")),
    (nats.errors.NoRespondersError(), StreamProblem("no JetStream responder")),
    (info(None, 0.2, 0.3), StreamProblem("PKI_SIGNING has no leader")),
    (UNAVAILABLE, StreamProblem("error 503 JetStream system temporarily unavailable")),
    (b"garbage", StreamProblem("an unreadable answer (b'garbage')")),
])
async def test_the_probe_names_why_the_stream_cannot_store(answer: bytes | Exception,
                                                           problem: StreamProblem | None) -> None:
    nc = FakeClient([answer])
    assert await stream_quorum_problem(nc, STREAM, 1.0) == problem  # type: ignore[arg-type]
    assert nc.asked == [SUBJECT]


async def test_three_probes_showing_the_server_cut_off_move_the_client_once() -> None:
    nc = FakeClient([CUT_OFF, CUT_OFF, CUT_OFF, OK])
    clock = Clock()
    dog = QuorumWatchdog(nc, "cara", STREAM, probe_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert await probes(dog, clock, 4) == [False, False, True, False]
    assert nc.reconnects == 1 and dog.moves == 1
    assert nc.asked == [SUBJECT] * 4


async def test_an_answer_between_failures_starts_the_count_again() -> None:
    nc = FakeClient([CUT_OFF, CUT_OFF, OK, CUT_OFF, CUT_OFF, OK])
    clock = Clock()
    dog = QuorumWatchdog(nc, "clm", STREAM, probe_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert await probes(dog, clock, 6) == [False] * 6
    assert nc.reconnects == 0


async def test_while_every_server_fails_the_client_moves_at_most_once_per_gap() -> None:
    nc = FakeClient([CUT_OFF] * 30)
    clock = Clock()
    dog = QuorumWatchdog(nc, "watcher", STREAM, probe_seconds=1.0, min_gap_seconds=10.0,  # type: ignore[arg-type]
                         clock=clock)
    moved = await probes(dog, clock, 30)
    # Moves at the 3rd probe, then not before 10 s later and 3 more failures: at the 13th and the 23rd.
    assert [i + 1 for i, m in enumerate(moved) if m] == [3, 13, 23]


async def test_a_server_of_the_majority_electing_a_leader_is_not_left() -> None:
    # The stream's leader was cut off; the majority elects a new one within 4-9 s: no answer meanwhile (the request
    # goes to the old leader), then "no leader" until the new one takes over.
    nc = FakeClient([UNSURE] * 9 + [info(None, 0.1, 9.0)] * 3 + [OK])
    clock = Clock()
    dog = QuorumWatchdog(nc, "cara", STREAM, probe_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert await probes(dog, clock, 13) == [False] * 13


async def test_a_server_cut_off_from_the_leader_is_left_at_last() -> None:
    nc = FakeClient([UNSURE] * 10 + [UNAVAILABLE] * 5)
    clock = Clock()
    dog = QuorumWatchdog(nc, "cara", STREAM, probe_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert [i + 1 for i, m in enumerate(await probes(dog, clock, 15)) if m] == [15]


async def test_a_client_reconnecting_by_itself_is_left_alone() -> None:
    nc = FakeClient([CUT_OFF, CUT_OFF])
    clock = Clock()
    dog = QuorumWatchdog(nc, "cara", STREAM, probe_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert await probes(dog, clock, 2) == [False, False]
    nc.is_connected = False
    assert await probes(dog, clock, 3) == [False] * 3
    assert nc.asked == [SUBJECT] * 2 and dog.failures == 0  # not probed while down; the count restarts


async def test_a_probe_the_closing_client_refuses_is_not_a_failure() -> None:
    nc = FakeClient([nats.errors.ConnectionClosedError()] * 5)
    clock = Clock()
    dog = QuorumWatchdog(nc, "cara", STREAM, probe_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert await probes(dog, clock, 5) == [False] * 5
    assert nc.reconnects == 0


@pytest.mark.parametrize(("servers", "seconds", "watched"), [
    (["nats://a:4222", "nats://b:4222"], 1.0, True),
    (["nats://a:4222"], 1.0, False),  # one server: nowhere to move
    (["nats://a:4222", "nats://b:4222"], 0.0, False),  # switched off
])
async def test_only_a_cluster_is_watched(servers: list[str], seconds: float, watched: bool) -> None:
    from hapki.runtime import bus

    nc = FakeClient([OK] * 10)
    bus.watch(nc, NatsConfig(servers=servers, quorum_probe_seconds=seconds), name="t",  # type: ignore[arg-type]
              stream=STREAM)
    try:
        assert (bus.watchdog_of(nc) is not None) is watched  # type: ignore[arg-type]
    finally:
        await bus.unwatch(nc)  # type: ignore[arg-type]
    assert bus.watchdog_of(nc) is None  # type: ignore[arg-type]
