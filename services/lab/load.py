"""Client-side load on the HA lab and what the database says afterwards: shared by `hapki lab demo`, the lab tests
and the fault suite. Every loop is bounded in time; traffic goes only to the lab's own namespaces.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiomysql
import nats.errors
from opentelemetry import trace

from hapki.cli.client import ClmClient
from hapki.contracts.models import IssueCertificate, IssueReply, RequestStatus
from hapki.runtime.invariants import violations
from hapki.runtime import telemetry

tracer = trace.get_tracer("hapki.lab.load")
# A client's patience per attempt before it retries with the same idempotency key (retries are safe, and CLM
# joins a retry to the attempt it is still handling): short at first, because a request taken by a member that
# then crashed gets no answer and this is what its client waits for (7x the p99 latency at 100/s); doubling per
# attempt up to a cap, so a long stall (Galera reconfiguring) is not met with a retry storm.
FIRST_ATTEMPT_TIMEOUT_SECONDS = 0.75
MAX_ATTEMPT_TIMEOUT_SECONDS = 4.0
RETRY_PAUSE_SECONDS = 0.1


def attempt_timeout(attempt: int) -> float:
    """Seconds the client waits on its `attempt`-th try (1-based)."""
    return min(MAX_ATTEMPT_TIMEOUT_SECONDS, FIRST_ATTEMPT_TIMEOUT_SECONDS * 2 ** (attempt - 1))


@dataclass
class Request:
    """One client request as the client saw it: its key, transport, outcome and timing."""

    key: str
    via: str
    sent_at: float
    trace_id: str = ""
    request_id: str | None = None
    serial: str | None = None
    done_at: float | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)  # every attempt's outcome and when (s from the first send)


class Load:
    """Paced issuance over NATS and HTTPS with idempotent retries; every loop is bounded in time."""

    def __init__(self, lab: Any, csrs: list[str], rate: float) -> None:
        self._lab, self._csrs, self._rate = lab, csrs, rate
        self.requests: list[Request] = []
        self._nats: ClmClient | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self._nats = await ClmClient.connect(self._lab.client_nats_config(), timeout=MAX_ATTEMPT_TIMEOUT_SECONDS)
        context = ssl.create_default_context(cafile=str(self._lab.ca_bundle))
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                           timeout=aiohttp.ClientTimeout(total=MAX_ATTEMPT_TIMEOUT_SECONDS))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._nats is not None:
            await self._nats.close()

    async def run(self, seconds: float, give_up_after: float) -> None:
        tasks = []
        began = time.monotonic()
        for i in range(int(seconds * self._rate)):
            await asyncio.sleep(max(0.0, began + i / self._rate - time.monotonic()))
            tasks.append(asyncio.create_task(self._one(i, give_up_after)))
        await asyncio.gather(*tasks)

    async def _one(self, i: int, give_up_after: float) -> None:
        req = Request(key=f"demo-{uuid.uuid4().hex}", via="https" if i % 2 else "nats", sent_at=time.time())
        self.requests.append(req)
        body = IssueCertificate(csr_pem=self._csrs[i % len(self._csrs)], profile="tls-server",
                                requester="lab-demo", idempotency_key=req.key)
        with tracer.start_as_current_span("demo.issue") as span:
            req.trace_id = format(span.get_span_context().trace_id, "032x")
            deadline = time.monotonic() + give_up_after
            while time.monotonic() < deadline:
                req.attempts += 1
                try:
                    wait = attempt_timeout(req.attempts)
                    reply = await self.issue_once(req.via, body, wait)
                # nats.errors.Error: a NATS request nobody answered, e.g. "no responders" while CLM's subscriptions
                # move to another bus node after theirs died; like a client, ask again (same idempotency key).
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, nats.errors.Error) as exc:
                    req.errors.append(f"{type(exc).__name__} at +{time.time() - req.sent_at:.2f} s")
                    req.trail.append(req.errors[-1])
                    await asyncio.sleep(RETRY_PAUSE_SECONDS)
                    continue
                if reply.error is not None:
                    req.errors.append(f"{reply.error.code.value} at +{time.time() - req.sent_at:.2f} s")
                    req.trail.append(req.errors[-1])
                    await asyncio.sleep(RETRY_PAUSE_SECONDS)
                    continue
                req.request_id = reply.request_id
                req.trail.append(f"{reply.status.value} at +{time.time() - req.sent_at:.2f} s")
                if reply.status is RequestStatus.ISSUED:
                    req.serial, req.done_at = reply.serial, time.time()
                    return
                await asyncio.sleep(RETRY_PAUSE_SECONDS)  # pending: ask again with the same key

    async def issue_once(self, via: str, body: IssueCertificate, timeout: float) -> IssueReply:
        """One attempt over `via` ("nats": a NATS request to CLM; "https": a POST to the CLM VIP)."""
        return await (self._via_https(body, timeout) if via == "https" else self._nats_issue(body, timeout))

    async def _nats_issue(self, body: IssueCertificate, timeout: float) -> IssueReply:
        assert self._nats is not None
        return await self._nats.issue(body, timeout=timeout)

    async def _via_https(self, body: IssueCertificate, timeout: float) -> IssueReply:
        assert self._http is not None
        async with self._http.post(f"{self._lab.url('clm')}/v1/issue", data=body.model_dump_json(),
                                   headers=telemetry.inject({"Content-Type": "application/json"}),
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return IssueReply.model_validate_json(await response.read())


def crash_member(lab: Any, member: str) -> float:
    """A true crash of every process of `member` (CARA's signer workers too): SIGSTOP all (nobody can react), then
    SIGKILL all."""
    from hapki.cli.procstat import with_descendants

    pids = with_descendants(pid for name in lab.procs.names(member=member) for pid in lab.procs.pids(name))
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return time.time()


async def watch_vip(lab: Any, tier: str, until: float, seen: list[tuple[float, tuple[str, ...]]]) -> None:
    """Record every change of the VIP holders, with wall-clock time."""
    last: tuple[str, ...] | None = None
    while time.monotonic() < until:
        holders = tuple(await asyncio.to_thread(lab.vip_holders, tier))
        if holders != last:
            seen.append((time.time(), holders))
            last = holders
        await asyncio.sleep(0.02)


async def connect_db(lab: Any) -> aiomysql.Connection:
    """A direct connection from the host to the first Galera node, for assertions and reports."""
    db = lab.galera.nodes[0]
    return await aiomysql.connect(host=db.address, port=db.port, user="hapki", db="hapki", autocommit=True,
                                  password=lab.galera.password("hapki"), ssl=lab.db_ssl_context())


async def read_violations(lab: Any) -> dict[str, list[tuple[Any, ...]]]:
    """The rows violating each invariant of hapki.runtime.invariants now, read on the first Galera node."""
    conn = await connect_db(lab)
    try:
        return await violations(conn)
    finally:
        conn.close()


async def database_facts(lab: Any, keys: list[str], crashed: str, crash_at: float) -> dict[str, Any]:
    """What the database says: requests per key, certificates per request, epochs, first signatures after the crash."""
    conn = await connect_db(lab)
    try:
        async with conn.cursor() as cur:
            marks = ",".join(["%s"] * len(keys))
            await cur.execute(f"SELECT r.idempotency_key, r.id, r.status, COUNT(c.serial) FROM requests r"
                              f" LEFT JOIN certificates c ON c.request_id = r.id WHERE r.requester = 'lab-demo'"
                              f" AND r.idempotency_key IN ({marks}) GROUP BY r.id", keys)
            rows = await cur.fetchall()
            since = datetime.fromtimestamp(crash_at, UTC).replace(tzinfo=None)
            await cur.execute("SELECT member, MIN(created_at) FROM signing_intents WHERE created_at >= %s"
                              " GROUP BY member", (since,))
            first = {m: t.replace(tzinfo=UTC).timestamp() for m, t in await cur.fetchall()}
            await cur.execute("SELECT epoch, holder, updated_at FROM epochs WHERE tier = 'cara'")
            epoch = await cur.fetchone()
            await cur.execute("SELECT state, COUNT(*) FROM signing_intents i JOIN requests r ON r.id = i.request_id"
                              " WHERE r.requester = 'lab-demo' GROUP BY state")
            intents = dict(await cur.fetchall())
    finally:
        conn.close()
    return {
        "requests": {k: (rid, status, certs) for k, rid, status, certs in rows},
        "first_signature": {m: t for m, t in first.items() if m != crashed},
        "epoch": epoch,
        "intents": intents,
    }
