"""The fault suite (`hapki chaos`): single failures under steady issuance load, checked against the invariants.

One run of a scenario (hapki.lab.scenarios), step by step:
1. a healthy lab: `Lab.heal()` then `Lab.wait_steady()` (Galera Synced x3, NATS healthy, VIPs home, the preferred
   CARA member signing); the scenario's `prepare`, if any; the invariant violations already in the database
   are noted (a run is judged only by what it adds);
2. steady load at `rate` requests/s for `lead + hold + tail` seconds (hapki.lab.load.Load: NATS and HTTPS on the
   CLM VIP alternately, each request retried with its idempotency key until issued, as a real client would);
   the fault `lead` s in, the scenario's restore `hold` s after the fault;
3. quiet: wait (bounded) until none of the run's requests is pending and none of its intents is reserved;
4. heal again and wait steady (a killed node rejoined), then measure from the client records and the database.

What a run reports (`RunResult`):
- sent: requests the client made (distinct idempotency keys); accepted: of those, recorded by CLM (a `requests`
  row); completed: the client received a certificate;
- lost: accepted but without exactly one certificate once quiet (still pending, failed, or none stored), plus
  certificates a client received that the database does not hold for its request;
- duplicated: requests with more than one certificate, plus clients that got a certificate other than the stored one;
- unaccounted: signing intents of the run's requests left `reserved` once quiet, or `issued` without their
  certificate (an HSM signature nobody can account for);
- violations: rows that each query of hapki.runtime.invariants returns now and did not before the run (stale-epoch
  commits, duplicate serials, ...), and whether the Galera nodes agree (row counts and CHECKSUM TABLE);
- unavailability (seconds, client-visible): the largest *excess wait* of any request of the run, where a
  request's wait is from its first send to the reply carrying its certificate (across retries) and the excess is
  that wait minus the normal latency (the median wait of requests sent and completed before the fault). A request
  never completed counts until the load ended. This is how much longer than usual the unluckiest client waited;
  `request_p99` is the 99th percentile of the same excess over the run's requests (most are unaffected, so this
  shows how many clients a fault touches: the table prints its worst run);
- first_signature (seconds): from the fault to the first HSM signature made for an intent created at or after the
  fault, by whichever member signs after the fault (certificates.created_at is taken right after C_Sign, so a
  reservation that stalls in Galera does not count early);
- resumed (seconds, client side): from the fault to the first certificate received for a request sent after it;
- galera_resumed (db and site scenarios; seconds): from the fault to when Galera itself commits again: the lab host writes
  a row per node (database hapki_probe, not the product's) every PROBE_INTERVAL s on its own connections, and
  this is the first commit, on any node, of a write begun after the fault. A write begun during the stall hangs
  until the cluster commits again, so the figure is exact up to that interval. `resume_lag` = first_signature -
  galera_resumed: how long after Galera the CA signs again (the goal: issuance resumes as soon as Galera does).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import pymysql.err
from hapki.runtime.invariants import new_rows, violations
from hapki.runtime.audit_verify import verify_database
from hapki.runtime.db import Database
from hapki.lab.load import Load, Request
from hapki.lab.traces import percentile
from hapki.lab.scenarios import ALIASES, SCENARIOS, Scenario

__all__ = ["ChaosRunner", "RunResult", "Summary", "format_table", "resolve", "summarize"]

log = logging.getLogger(__name__)

DEFAULT_RATE = 100.0  # requests/s, half over NATS, half over HTTPS (carried by the 2-core lab host, see RELIABILITY)
LEAD_SECONDS = 1.5  # load before the fault: the normal latency is measured here
GIVE_UP_AFTER = 60.0  # a client stops retrying a request after this long
QUIET_TIMEOUT = 90.0  # seconds to wait for every request of a run to be final and every intent resolved
STEADY_TIMEOUT = 90.0
AUDIT_GRACE_SECONDS = 30.0  # entries may wait this long for the sealer (it pauses while CARA fails over)
AUDIT_SETTLE_SECONDS = 10.0
SLOWEST_KEPT = 5  # requests per run whose timeline goes into the JSON record
ROWS_KEPT = 5  # new violating rows per invariant, and unaccounted intents, kept in a run's record
PROBE_INTERVAL = 0.1  # seconds between the Galera probe's writes to one node (db scenarios)
PROBE_TIMEOUT = 2.0  # a probe write (or connect) that takes longer is abandoned and its connection closed
# sql_notes = 0: from the second run on, "already exists" notes reached the terminal as Python warnings (aiomysql
# raises them while the cursor reads the later statements' results, on close).
PROBE_SETUP = ("SET SESSION sql_notes = 0; CREATE DATABASE IF NOT EXISTS hapki_probe;"
               " CREATE TABLE IF NOT EXISTS hapki_probe.beat (node VARCHAR(32) PRIMARY KEY, n BIGINT NOT NULL,"
               " at DATETIME(6) NOT NULL) ENGINE=InnoDB")
PROBE_WRITE = ("INSERT INTO hapki_probe.beat (node, n, at) VALUES (%s, 1, NOW(6))"
               " ON DUPLICATE KEY UPDATE n = n + 1, at = NOW(6)")


@dataclass
class RunResult:
    """The measurements of one run of one scenario (see the module docstring for each field's definition)."""

    scenario: str
    run: int
    rate: float
    sent: int = 0
    accepted: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    unaccounted: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    # The new violating rows themselves (a few per invariant) and the run's unaccounted intents, for diagnosis.
    violation_rows: dict[str, list[list[str]]] = field(default_factory=dict)
    unaccounted_rows: list[list[str]] = field(default_factory=list)
    galera_agree: bool = True
    galera: dict[str, Any] = field(default_factory=dict)
    audit: str | None = None  # `hapki audit verify` of the whole log after the run: None = intact, else the finding
    unavailability: float | None = None
    request_p99: float | None = None
    first_signature: float | None = None
    first_signer: str | None = None
    faulted_member: str | None = None  # the tier member the fault was aimed at, if the scenario names one
    resumed: float | None = None
    galera_resumed: float | None = None  # db scenarios: fault -> Galera commits again (the probe)
    resume_lag: float | None = None  # first_signature - galera_resumed
    normal_latency: float | None = None
    longest_gap: float | None = None
    quiet_after: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # The unluckiest requests, for diagnosis: sent (s from the fault), waited (s), attempts and their errors.
    slowest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No request lost or duplicated, every signature accounted for, no new violation, Galera in agreement."""
        return (self.lost == 0 and self.duplicated == 0 and self.unaccounted == 0 and not any(self.violations.values())
                and self.galera_agree and self.audit is None and self.sent > 0)


def resolve(names: list[str] | None) -> list[Scenario]:
    """Scenarios by name (aliases allowed); all of them, in registry order, for None or []."""
    if not names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if ALIASES.get(n, n) not in SCENARIOS]
    if unknown:
        raise KeyError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return [SCENARIOS[ALIASES.get(n, n)] for n in names]


class ChaosRunner:
    """Runs scenarios against a lab that is up (see the module docstring)."""

    def __init__(self, lab: Any, csrs: list[str], *, rate: float = DEFAULT_RATE, lead: float = LEAD_SECONDS,
                 give_up_after: float = GIVE_UP_AFTER, quiet_timeout: float = QUIET_TIMEOUT,
                 seconds: float | None = None) -> None:
        self.lab, self.csrs, self.rate, self.lead = lab, csrs, rate, lead
        self.give_up_after, self.quiet_timeout = give_up_after, quiet_timeout
        self.seconds = seconds  # overrides lead + hold + tail when given (never shorter than lead + hold + 1)

    def run(self, scenario: Scenario, index: int = 0) -> RunResult:
        """One run: healthy lab, load, fault, restore, quiet, heal, measurements."""
        began = time.monotonic()
        result = RunResult(scenario=scenario.name, run=index, rate=self.rate)
        # Step 1: a healthy lab, the scenario's preparation, the violations already present.
        self.lab.heal()
        self.lab.wait_steady(STEADY_TIMEOUT)
        ctx: dict[str, Any] = {}
        if scenario.prepare is not None:
            scenario.prepare(self.lab, ctx)
            self.lab.wait_steady(STEADY_TIMEOUT)
        before = asyncio.run(self._violations())
        # Step 2: load, fault, restore.
        load, fault_at, load_end = asyncio.run(self._load(scenario, ctx, result))
        # Step 3: quiet.
        keys = [r.key for r in load.requests]
        result.quiet_after = asyncio.run(self._wait_quiet(keys))
        if result.quiet_after is None:
            result.notes.append(f"not quiet after {self.quiet_timeout:.0f} s")
        # Step 4: heal, steady, measure.
        self.lab.heal()
        self.lab.wait_steady(STEADY_TIMEOUT)
        after = asyncio.run(self._violations())
        made = new_rows(before, after)
        result.violations = {name: len(rows) for name, rows in made.items()}
        result.violation_rows = {name: [[str(v) for v in row] for row in rows[:ROWS_KEPT]]
                                 for name, rows in made.items() if rows}
        asyncio.run(self._measure(result, load.requests, fault_at, load_end))
        result.galera = self._galera_agreement()
        result.galera_agree = len({json.dumps(v, sort_keys=True) for v in result.galera.values()}) == 1
        result.audit = asyncio.run(self._audit())
        result.seconds = round(time.monotonic() - began, 1)
        log.info("chaos %s run %d: %s", scenario.name, index, asdict(result))
        return result

    # --- load ---------------------------------------------------------------------------------------------

    async def _load(self, scenario: Scenario, ctx: dict[str, Any],
                    result: RunResult) -> tuple[Load, float, float]:
        seconds = self.lead + scenario.hold + scenario.tail if scenario.restore else self.lead + scenario.tail
        if self.seconds is not None:
            seconds = max(self.seconds, self.lead + (scenario.hold if scenario.restore else 0.0) + 1.0)
        probe = _GaleraProbe(self.lab) if scenario.kind in ("db", "site") else None
        if probe is not None:
            await probe.start()
        async with Load(self.lab, self.csrs, self.rate) as load:
            driver = asyncio.create_task(load.run(seconds, give_up_after=self.give_up_after))
            try:
                await asyncio.sleep(self.lead)
                fault_at = await asyncio.to_thread(scenario.inject, self.lab, ctx)
                result.faulted_member = ctx.get("member")
                if scenario.restore is not None:
                    await asyncio.sleep(max(0.0, fault_at + scenario.hold - time.time()))
                    restore_began = time.time()
                    await asyncio.to_thread(scenario.restore, self.lab, ctx)
                    result.notes.append(f"restore took {time.time() - restore_began:.1f} s")
                    result.notes.extend(ctx.get("notes", []))
            finally:
                await driver
                if probe is not None:
                    await probe.stop()
            load_end = time.time()
        if probe is not None:
            resumed = probe.resumed_after(fault_at)
            result.galera_resumed = None if resumed is None else round(resumed - fault_at, 3)
        return load, fault_at, load_end

    # --- database -----------------------------------------------------------------------------------------

    async def _connect(self) -> aiomysql.Connection:
        """A connection to the first database node that answers, reading its own and the cluster's writes."""
        last: Exception | None = None
        for node in self.lab.galera.nodes:
            try:
                conn = await aiomysql.connect(host=node.address, port=node.port, user="hapki", db="hapki",
                                              autocommit=True, password=self.lab.galera.password("hapki"),
                                              connect_timeout=2, ssl=self.lab.db_ssl_context())
            except Exception as exc:  # noqa: BLE001 - try the next node
                last = exc
                continue
            async with conn.cursor() as cur:
                await cur.execute("SET SESSION wsrep_sync_wait = 1")
            return conn
        raise RuntimeError(f"no database node answers: {last}")

    async def _violations(self) -> dict[str, list[tuple[Any, ...]]]:
        conn = await self._connect()
        try:
            return await violations(conn)
        finally:
            conn.close()

    async def _wait_quiet(self, keys: list[str]) -> float | None:
        """Seconds until no request of ``keys`` is pending and none of their intents is reserved; None: timeout."""
        began = time.monotonic()
        marks = ",".join(["%s"] * len(keys))
        while time.monotonic() - began < self.quiet_timeout:
            try:
                conn = await self._connect()
                try:
                    async with conn.cursor() as cur:
                        await cur.execute(
                            f"SELECT (SELECT COUNT(*) FROM requests WHERE requester = 'lab-demo' AND status = 'pending'"
                            f" AND idempotency_key IN ({marks})),"
                            f" (SELECT COUNT(*) FROM signing_intents i JOIN requests r ON r.id = i.request_id"
                            f" WHERE i.state = 'reserved' AND r.requester = 'lab-demo'"
                            f" AND r.idempotency_key IN ({marks}))", [*keys, *keys])
                        pending, reserved = await cur.fetchone()
                finally:
                    conn.close()
                if pending == 0 and reserved == 0:
                    return round(time.monotonic() - began, 2)
            except Exception as exc:  # noqa: BLE001 - the database may still be recovering: ask again
                log.info("quiet check failed: %s", exc)
            await asyncio.sleep(0.5)
        return None

    async def _measure(self, result: RunResult, requests: list[Request], fault_at: float, load_end: float) -> None:
        keys = [r.key for r in requests]
        marks = ",".join(["%s"] * len(keys))
        conn = await self._connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute(
                    f"SELECT r.idempotency_key, r.status, COUNT(c.serial), MIN(c.serial) FROM requests r"
                    f" LEFT JOIN certificates c ON c.request_id = r.id WHERE r.requester = 'lab-demo'"
                    f" AND r.idempotency_key IN ({marks}) GROUP BY r.id", keys)
                stored = {k: (status, certs, serial) for k, status, certs, serial in await cur.fetchall()}
                await cur.execute(
                    f"SELECT SUM(i.state = 'reserved'), SUM(i.state = 'issued' AND c.intent_id IS NULL)"
                    f" FROM signing_intents i JOIN requests r ON r.id = i.request_id"
                    f" LEFT JOIN certificates c ON c.intent_id = i.id"
                    f" WHERE r.requester = 'lab-demo' AND r.idempotency_key IN ({marks})", keys)
                reserved, orphaned = await cur.fetchone()
                if reserved or orphaned:
                    # Which intents, with their request's other intents and certificate: what a diagnosis needs.
                    await cur.execute(
                        f"SELECT i.request_id, i.id, i.state, i.epoch, i.member, i.serial, i.created_at,"
                        f" i.resolved_at, i.resolution, c.serial, c.intent_id FROM signing_intents i"
                        f" JOIN requests r ON r.id = i.request_id LEFT JOIN certificates c ON c.request_id = r.id"
                        f" WHERE r.requester = 'lab-demo' AND r.idempotency_key IN ({marks}) AND i.request_id IN"
                        f" (SELECT j.request_id FROM signing_intents j LEFT JOIN certificates d ON d.intent_id = j.id"
                        f" WHERE j.state = 'reserved' OR (j.state = 'issued' AND d.intent_id IS NULL))"
                        f" ORDER BY i.request_id, i.created_at LIMIT {ROWS_KEPT * 4}", keys)
                    result.unaccounted_rows = [[str(v) for v in row] for row in await cur.fetchall()]
                since = datetime.fromtimestamp(fault_at, UTC).replace(tzinfo=None)
                await cur.execute(
                    "SELECT i.member, c.created_at FROM certificates c JOIN signing_intents i ON i.id = c.intent_id"
                    " WHERE i.created_at >= %s ORDER BY c.created_at LIMIT 1", (since,))
                first = await cur.fetchone()
        finally:
            conn.close()
        # Counts.
        result.sent = len(requests)
        result.accepted = sum(1 for r in requests if r.key in stored)
        result.completed = sum(1 for r in requests if r.serial)
        lost = duplicated = 0
        for r in requests:
            status, certs, serial = stored.get(r.key, (None, 0, None))
            if status is not None and (status != "issued" or certs == 0):
                lost += 1
            elif r.serial and status is None:
                lost += 1  # a certificate the database does not know
            if certs > 1 or (r.serial and serial and r.serial.lower() != serial.lower()):
                duplicated += 1
        result.lost, result.duplicated = lost, duplicated
        result.unaccounted = int(reserved or 0) + int(orphaned or 0)
        # Timing.
        done_before = [r.done_at - r.sent_at for r in requests if r.done_at and r.done_at < fault_at]
        all_done = [r.done_at - r.sent_at for r in requests if r.done_at]
        normal = statistics.median(done_before or all_done or [0.0])
        result.normal_latency = round(normal, 4)
        waits = [((r.done_at or load_end) - r.sent_at) - normal for r in requests]
        result.unavailability = round(max([0.0, *waits]), 3)
        result.request_p99 = round(max(0.0, _pct(waits, 99) or 0.0), 3)
        worst = sorted(requests, key=lambda r: (r.done_at or load_end) - r.sent_at, reverse=True)[:SLOWEST_KEPT]
        result.slowest = [{"via": r.via, "key": r.key, "request_id": r.request_id, "sent": round(r.sent_at - fault_at, 3),
                           "waited": round((r.done_at or load_end) - r.sent_at, 3), "attempts": r.attempts,
                           "trail": r.trail[:10]} for r in worst]
        completions = sorted(r.done_at for r in requests if r.done_at and r.done_at >= fault_at)
        points = [fault_at, *completions]
        result.longest_gap = round(max((b - a for a, b in itertools.pairwise(points)), default=0.0), 3)
        after = [r.done_at for r in requests if r.done_at and r.sent_at >= fault_at]
        result.resumed = round(min(after) - fault_at, 3) if after else None
        if first is not None:
            result.first_signer = first[0]
            result.first_signature = round(first[1].replace(tzinfo=UTC).timestamp() - fault_at, 3)
        if result.first_signature is not None and result.galera_resumed is not None:
            result.resume_lag = round(result.first_signature - result.galera_resumed, 3)

    async def _audit(self) -> str | None:
        """The audit log verified as `hapki audit verify` does (after heal: the sealer has caught up)."""
        db = Database(self.lab.database_config())
        try:
            deadline = time.monotonic() + AUDIT_SETTLE_SECONDS
            while True:
                report = await verify_database(db, now=datetime.now(UTC), grace=timedelta(seconds=AUDIT_GRACE_SECONDS))
                if report.ok or time.monotonic() > deadline:
                    return None if report.ok else report.summary()
                await asyncio.sleep(0.5)  # e.g. a checkpoint not signed yet after a failover
        finally:
            await db.close()

    def _galera_agreement(self) -> dict[str, Any]:
        """Per node: row counts of the three tables and CHECKSUM TABLE certificates (after a causality wait)."""
        out: dict[str, Any] = {}
        sql = ("SET SESSION wsrep_sync_wait = 15; SELECT (SELECT COUNT(*) FROM hapki.requests),"
               " (SELECT COUNT(*) FROM hapki.signing_intents), (SELECT COUNT(*) FROM hapki.certificates);"
               " CHECKSUM TABLE hapki.certificates")
        for node in self.lab.galera.nodes:
            try:
                lines = node.sql(sql, timeout=30).strip().splitlines()
                counts = lines[0].split("\t")
                out[node.name] = {"requests": int(counts[0]), "intents": int(counts[1]),
                                  "certificates": int(counts[2]), "checksum": lines[1].split("\t")[-1]}
            except Exception as exc:  # noqa: BLE001 - reported as disagreement
                out[node.name] = {"error": str(exc)[:200]}
        return out


class _GaleraProbe:
    """Writes a row per Galera node every PROBE_INTERVAL s from the lab host; records (began, ended) of each commit.

    One task and connection per node, each write bounded by PROBE_TIMEOUT (the connection is then closed and a new
    one made). The product's tables and users are not involved: database hapki_probe, the lab's admin user.
    """

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.commits: list[tuple[str, float, float]] = []  # (node, began, ended), wall-clock seconds
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        conn = await self._connect(self.lab.galera.nodes[0])
        try:
            async with conn.cursor() as cur:
                await cur.execute(PROBE_SETUP)
        finally:
            conn.close()
        self._tasks = [asyncio.create_task(self._beat(node)) for node in self.lab.galera.nodes]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def resumed_after(self, fault_at: float) -> float | None:
        """When the first write begun after `fault_at` committed, on any node (None: none did)."""
        return min((ended for _, began, ended in self.commits if began >= fault_at), default=None)

    async def _connect(self, node: Any) -> aiomysql.Connection:
        return await asyncio.wait_for(aiomysql.connect(
            host=node.address, port=node.port, user="hapki", password=self.lab.galera.password("hapki"),
            autocommit=True, connect_timeout=PROBE_TIMEOUT, ssl=self.lab.db_ssl_context()), PROBE_TIMEOUT)

    async def _beat(self, node: Any) -> None:
        conn: aiomysql.Connection | None = None
        while not self._stop.is_set():
            began = time.time()
            try:
                if conn is None:
                    conn = await self._connect(node)
                async with conn.cursor() as cur:
                    await asyncio.wait_for(cur.execute(PROBE_WRITE, (node.name,)), PROBE_TIMEOUT)
                self.commits.append((node.name, began, time.time()))
            except (TimeoutError, OSError, pymysql.err.Error) as exc:
                # Down, cut off, non-Primary (1047) or stalled: what the probe is for. A fresh connection next time.
                log.debug("galera probe %s: %s", node.name, exc)
                if conn is not None:
                    conn.close()
                    conn = None
            try:
                await asyncio.wait_for(self._stop.wait(), PROBE_INTERVAL)
            except TimeoutError:
                pass
        if conn is not None:
            conn.close()


# --- summaries ------------------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    return percentile(sorted(values), q)


@dataclass
class Summary:
    """One scenario over its runs: counts summed, times as p50/p99/max over runs (nearest rank)."""

    scenario: str
    runs: int
    rate: float
    sent: int
    accepted: int
    completed: int
    lost: int
    duplicated: int
    unaccounted: int
    violations: int
    galera_disagreed: int
    audit_broken: int
    unavailability: dict[str, float | None]
    request_p99_max: float | None
    first_signature: dict[str, float | None]
    resumed: dict[str, float | None]
    galera_resumed: dict[str, float | None]
    resume_lag: dict[str, float | None]
    clean_runs: int


def summarize(results: list[RunResult]) -> list[Summary]:
    """A Summary per scenario, in the order the scenarios first appear."""
    names = list(dict.fromkeys(r.scenario for r in results))
    out = []
    for name in names:
        runs = [r for r in results if r.scenario == name]

        def stats(get: Callable[[RunResult], float | None], runs: list[RunResult] = runs) -> dict[str, float | None]:
            values = [v for v in map(get, runs) if v is not None]
            return {"p50": _pct(values, 50), "p99": _pct(values, 99), "max": max(values) if values else None,
                    "missing": len(runs) - len(values)}

        out.append(Summary(
            scenario=name, runs=len(runs), rate=runs[0].rate, sent=sum(r.sent for r in runs),
            accepted=sum(r.accepted for r in runs), completed=sum(r.completed for r in runs),
            lost=sum(r.lost for r in runs), duplicated=sum(r.duplicated for r in runs),
            unaccounted=sum(r.unaccounted for r in runs),
            violations=sum(sum(r.violations.values()) for r in runs),
            galera_disagreed=sum(not r.galera_agree for r in runs),
            audit_broken=sum(r.audit is not None for r in runs),
            unavailability=stats(lambda r: r.unavailability),
            request_p99_max=max((r.request_p99 for r in runs if r.request_p99 is not None), default=None),
            first_signature=stats(lambda r: r.first_signature),
            resumed=stats(lambda r: r.resumed), galera_resumed=stats(lambda r: r.galera_resumed),
            resume_lag=stats(lambda r: r.resume_lag), clean_runs=sum(r.clean for r in runs),
        ))
    return out


def format_table(summaries: list[Summary]) -> str:
    """A fixed-width table: one line per scenario (times in seconds, p50/p99/max over runs)."""
    def trio(d: dict[str, float | None]) -> str:
        if all(d[k] is None for k in ("p50", "p99", "max")):
            return "-"
        return "/".join("-" if d[k] is None else f"{d[k]:.2f}" for k in ("p50", "p99", "max"))

    head = (f"{'scenario':18} {'runs':>4} {'sent':>6} {'accepted':>8} {'completed':>9} {'lost':>4} {'dup':>3} "
            f"{'unacct':>6} {'viol':>4} {'unavailability s':>17} {'req p99':>7} {'first signature s':>18} "
            f"{'resumed s':>17} {'galera resumed s':>17} {'lag s':>17}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(f"{s.scenario:18} {s.runs:>4} {s.sent:>6} {s.accepted:>8} {s.completed:>9} {s.lost:>4} "
                     f"{s.duplicated:>3} {s.unaccounted:>6} {s.violations + s.galera_disagreed + s.audit_broken:>4} "
                     f"{trio(s.unavailability):>17} {'-' if s.request_p99_max is None else f'{s.request_p99_max:.2f}':>7} "
                     f"{trio(s.first_signature):>18} {trio(s.resumed):>17} {trio(s.galera_resumed):>17} "
                     f"{trio(s.resume_lag):>17}")
    return "\n".join(lines)
