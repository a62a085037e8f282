"""MariaDB/Galera access: a pool per node, whole-transaction retries, node failover, typed errors.

Callers pass a transaction body `async def body(cur) -> T`; `Database.run` owns BEGIN/COMMIT, retries and
error mapping. Bodies must be idempotent: after a connection dies during COMMIT the outcome is unknown and
the body runs again, so it should look for its own earlier effect first (see FIELD-NOTES: 1180/2013).
No driver exception leaves this module.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import aiomysql
import aiomysql.connection
import pymysql.converters
import pymysql.err
from opentelemetry import trace
from pymysql.constants import CLIENT

from hapki.contracts.errors import CommitOutcomeUnknown, DatabaseError, DuplicateKey, FencedOut, GuardFailed, Internal
from hapki.runtime import telemetry
from hapki.runtime.config import DatabaseConfig, read_secret

log = logging.getLogger("hapki.db")
tracer = trace.get_tracer("hapki.db")
T = TypeVar("T")
Body = Callable[[aiomysql.Cursor], Awaitable[T]]

# MariaDB / client error numbers (FIELD-NOTES, Galera section).
ER_DUP_ENTRY = 1062
ER_BAD_NULL_ERROR = 1048  # our fence: a stale epoch sets fence_seq to NULL (see _FENCE_AND_COMMIT)
ER_LOCK_DEADLOCK = 1213  # also Galera certification conflicts: retry the whole transaction
ER_LOCK_WAIT_TIMEOUT = 1205
ER_UNKNOWN_COM_ERROR = 1047  # Galera: node not ready / non-Primary
ER_ERROR_DURING_COMMIT = 1180
ER_QUERY_INTERRUPTED = 1317
ER_SP_DOES_NOT_EXIST = 1305  # our commit guard: the savepoint is gone, the cluster rolled the transaction back
CR_CONN_HOST_ERROR = 2003
CR_SERVER_GONE = 2006
CR_SERVER_LOST = 2013
RETRY_SAME_NODE = {ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT, ER_SP_DOES_NOT_EXIST}
POOL_RECYCLE_SECONDS = 3600.0  # idle connections older than this are replaced (server wait_timeout is 8 h)
NODE_DOWN = {ER_UNKNOWN_COM_ERROR, CR_CONN_HOST_ERROR, CR_SERVER_GONE, CR_SERVER_LOST, ER_QUERY_INTERRUPTED, 1053, 1927}
# Failing back (DatabaseConfig.fail_back_seconds): the bound of one status read, the most the interval grows to, and
# how soon after being given the work back a node's failure counts as flapping (the interval then doubles).
FAIL_BACK_STATUS_TIMEOUT = 2.0
FAIL_BACK_MAX_SECONDS = 300.0
FAIL_BACK_FLAP_SECONDS = 60.0
GALERA_SYNCED = "4"  # wsrep_local_state of a node that is part of the cluster and up to date
# After a transaction timed out on a node: how long its status read may take. One that answers in time as Primary,
# ready and synced only stalled or was slow, and the transaction is retried there once.
TIMEOUT_STATUS_SECONDS = 1.0


def _escape_bytes(value: bytes, mapping: object = None) -> str:
    """A bytes query argument as a binary hex literal (charset-proof; what PyMySQL 1.2 itself emits)."""
    return f"_binary X'{value.hex()}'"


def escape_string(value: str, mapping: object = None) -> str:
    """PyMySQL's `escape_string` (a backslash before NUL, newline, CR, ^Z, both quotes and the backslash), by
    `str.replace`: the same output, 8-10 times faster on the long values of the issuance path. PyMySQL's
    `str.translate` with a table of multi-character replacements took 19-22 us for a CSR's JSON or a certificate's
    PEM (about 50 us per issuance across CLM and CARA), this 1.6-2.6 us; short values cost the same."""
    return (value.replace("\\", "\\\\").replace("\0", "\\0").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\032", "\\Z").replace('"', '\\"').replace("'", "\\'"))


def _tune_escaping() -> None:
    """Two replacements in aiomysql's connection module, each only while it still has what it replaces.

    - Bytes arguments: aiomysql 0.3.2 escapes them with PyMySQL's `escape_bytes_prefixed`, which PyMySQL 1.2.3 turned
      into a placeholder string: every query with a bytes argument raised `TypeError: 'str' object is not callable`
      (aio-libs/aiomysql#1080; its fix, #1081, defines the same function in aiomysql). Once aiomysql ships the fix
      this does nothing.
    - String arguments: `escape_string` above, where the module still uses PyMySQL's (tests/unit/runtime/test_db_escape
      holds the two to the same output)."""
    if not callable(aiomysql.connection.escape_bytes_prefixed):
        aiomysql.connection.escape_bytes_prefixed = _escape_bytes
    if aiomysql.connection.escape_string is pymysql.converters.escape_string:
        aiomysql.connection.escape_string = escape_string


_tune_escaping()

# Strict mode is what turns the fence's NULL into an error; it is set per session, not trusted from the server.
_SESSION_SQL_MODE = "sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO'"
# The fence and the COMMIT in one round trip (_FENCE; [at_fence statements;] COMMIT): the epochs row lock is held
# only for the server-side commit, not while this process gets round to sending COMMIT (under load that wait
# dominated, every signing transaction queueing on the one row). A stale epoch writes NULL into a NOT NULL column: an
# error, so the COMMIT after it never runs. The write (not a read) matters on Galera: a concurrent epoch bump on
# another node conflicts with it at certification, so one of the two transactions fails instead of both committing.
# The new fence_seq is kept in @hapki_fence_seq for the statements the body puts after the fence (at_fence: commit
# order, see 0002).
_FENCE = "UPDATE epochs SET fence_seq = IF(epoch = %s, @hapki_fence_seq := fence_seq + 1, NULL) WHERE tier = %s"
# The same with the body's guards (fence_guard) ANDed in after the epoch. @hapki_epoch_ok keeps whether the epoch
# held, so a refusal can be told apart afterwards: a stale epoch (FencedOut) or a false guard (GuardFailed).
_GUARDED_FENCE = ("UPDATE epochs SET fence_seq = IF((@hapki_epoch_ok := (epoch = %s)) AND {guards},"
                  " @hapki_fence_seq := fence_seq + 1, NULL) WHERE tier = %s")
# The commit guard around the fence's round trip. Galera may roll a transaction back in the middle of a
# multi-statement round trip (a brute-force abort: a replicated write set wins a lock it holds); MariaDB then runs
# the round trip's remaining statements in a new transaction and reports the abort only at the end, after its
# COMMIT committed them (codership/mysql-wsrep#191, the same for stored procedures). Seen in the fault suite
# (session 23, db-partition): a batch's certificates committed without their intents, requests and audit entries,
# and without the fence. The savepoint exists only in the transaction that set it: in the new one, RELEASE fails
# (1305), MariaDB runs nothing after it, COMMIT included, and the body runs again (RETRY_SAME_NODE).
_SAVEPOINT = "SAVEPOINT hapki_commit"
_RELEASE = "RELEASE SAVEPOINT hapki_commit"


@dataclass(frozen=True)
class Fence:
    """Commit only while `tier`'s epoch is still `epoch` (the tier's row exists once anyone bumped it).

    The body may put statements after the fence, before the COMMIT, in the same round trip (at_fence).
    """

    tier: str
    epoch: int


@dataclass
class _Transaction:
    """What Database.run needs to know of the body it runs: fenced (the body may not commit), committed by it, and
    the statements it put after the fence (at_fence)."""

    fenced: bool
    committed: bool = False
    before_fence: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    guards: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    at_fence: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)

    def fence_round_trip(self, fence: Fence) -> tuple[list[str], list[object]]:
        """The statements of the fence's round trip (before_fence, the fence, at_fence, COMMIT) and their args, with
        the commit guard: SAVEPOINT first (after `SET TRANSACTION`, which must come before the transaction's first
        statement), RELEASE right before COMMIT. Results: `before` + 1, the fence, `at_fence` + 1, COMMIT."""
        statements: list[str] = []
        args: list[object] = []
        guarded = False
        for sql, values in self.before_fence:
            if not guarded and not sql.lstrip().upper().startswith("SET TRANSACTION"):
                statements.append(_SAVEPOINT)
                guarded = True
            statements.append(sql)
            args.extend(values)
        if not guarded:
            statements.append(_SAVEPOINT)
        if self.guards:
            statements.append(_GUARDED_FENCE.format(guards=" AND ".join(f"({sql})" for sql, _ in self.guards)))
            args.append(fence.epoch)
            for _, values in self.guards:
                args.extend(values)
        else:
            statements.append(_FENCE)
            args.append(fence.epoch)
        args.append(fence.tier)
        for sql, values in self.at_fence:
            statements.append(sql)
            args.extend(values)
        statements += [_RELEASE, "COMMIT"]
        return statements, args


_TRANSACTION: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar("hapki_db_transaction",
                                                                                     default=None)


def _fenced_transaction(what: str) -> _Transaction:
    transaction = _TRANSACTION.get()
    if transaction is None or not transaction.fenced:
        raise Internal(f"{what} outside the body of a fenced transaction")
    return transaction


def before_fence(sql: str, args: Sequence[object] = ()) -> None:
    """Run (sql, args) at the start of the fence's round trip, before the fence (no round trip of its own).

    For a body whose whole transaction fits in that one round trip: `SET TRANSACTION ISOLATION LEVEL ...` (only
    valid before the transaction's first statement), or writes whose effect a fence_guard checks. Their errors
    raise as the body's would; nothing after a failing statement runs, COMMIT included. In call order.
    """
    _fenced_transaction("before_fence").before_fence.append((sql, tuple(args)))


def fence_guard(condition: str, args: Sequence[object] = ()) -> None:
    """Commit only if the SQL boolean `condition` also holds, evaluated by the fence (after before_fence statements,
    before at_fence ones): instead of reading something back and deciding in a round trip of its own.

    A false (or NULL) condition under a current epoch fails the fence like a stale epoch does, so nothing of the
    transaction commits; Database.run then raises GuardFailed instead of FencedOut, and the body's caller takes its
    careful path. Several guards are ANDed.
    """
    _fenced_transaction("fence_guard").guards.append((condition, tuple(args)))


def at_fence(sql: str, args: Sequence[object] = ()) -> None:
    """Run (sql, args) after the fence of the fenced transaction the caller is the body of, before its COMMIT, in
    the fence's round trip (no round trip of its own). It may use @hapki_fence_seq, the fence sequence number this
    commit produced (commit order, see 0002): CARA inserts its certificates with it instead of inserting them first
    and stamping them after the fence (one row update per certificate less). Its errors are those of the commit: a
    duplicate key raises DuplicateKey and nothing of the transaction is committed. In call order; Internal outside
    a fenced transaction.
    """
    _fenced_transaction("at_fence").at_fence.append((sql, tuple(args)))


async def execute_many(cur: aiomysql.Cursor, statements: Sequence[tuple[str, Sequence[object]]], *,
                       commit: bool = False) -> list[tuple[int, list[tuple]]]:
    """Run `statements` (SQL, args) in one round trip; (row count, rows) of each, in order. Errors of any raise.

    `commit`: COMMIT in the same round trip, as the last step of the body (one round trip less per transaction;
    Database.run then sends no COMMIT). Only where nothing read back decides whether to commit: every reason not
    to must be an error of a statement (a duplicate key, ...), after which MariaDB runs none of the later
    statements, so the COMMIT never happens and Database.run rolls back as usual. If the COMMIT itself fails or
    its answer is lost, the body runs again like after any lost COMMIT (bodies look for their own earlier
    effect first). Refused (Internal) in a fenced transaction: there the fence commits, or nothing does.
    """
    transaction = _TRANSACTION.get()
    if commit and transaction is not None and transaction.fenced:
        raise Internal("a fenced transaction's body cannot commit: only its fence may")
    sqls = [sql for sql, _ in statements] + (["COMMIT"] if commit else [])
    await cur.execute("; ".join(sqls), tuple(arg for _, args in statements for arg in args))
    results = [(cur.rowcount, list(await cur.fetchall()))]
    for _ in range(len(sqls) - 1):
        await cur.nextset()  # the later statements' results: their errors surface here
        results.append((cur.rowcount, list(await cur.fetchall())))
    if commit and transaction is not None:
        transaction.committed = True  # only once the COMMIT answered
    return results[:len(statements)]


def _errno(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None



class _NodePool:
    """Connections to one node: at most `size` in use, each wait and each connect bounded on its own.

    Why not aiomysql.Pool (0.3.2): it opens new connections while holding the lock every acquire() and release()
    needs, with no bound on the handshake, so one connect to a node stuck in a Galera reconfiguration stalls every
    transaction of the process; and its release() of a closed connection frees the slot without waking anyone
    waiting for it (the same code as asyncmy#154), so after a node dies every waiter sleeps out its whole bound.
    Here a slot is a semaphore permit, always given back; connects run outside any lock under their own timeout.
    """

    def __init__(self, size: int, connect: Callable[[], Awaitable[aiomysql.Connection]], connect_timeout: float,
                 recycle_seconds: float) -> None:
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[aiomysql.Connection, float]] = []
        self._connect, self._connect_timeout, self._recycle = connect, connect_timeout, recycle_seconds
        self._closed = False

    async def acquire(self, timeout: float) -> aiomysql.Connection:
        """A connection, idle or new; raises _AcquireTimeout when no slot frees up within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise _AcquireTimeout("no free connection slot") from None
        try:
            now = time.monotonic()
            while self._idle:
                conn, since = self._idle.pop()
                if conn.closed or conn._reader.at_eof() or now - since > self._recycle:  # noqa: SLF001
                    conn.close()
                    continue
                return conn
            # The whole handshake (TCP, greeting, authentication, init_command) is bounded, not just TCP.
            try:
                async with asyncio.timeout(self._connect_timeout):
                    return await self._connect()
            except TimeoutError:
                raise _ConnectTimeout(f"no connection within {self._connect_timeout:.1f} s") from None
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: aiomysql.Connection, *, broken: bool) -> None:
        """Give the slot back; the connection is kept for reuse unless broken (then closed)."""
        if broken or self._closed or conn.closed:
            conn.close()
        else:
            self._idle.append((conn, time.monotonic()))
        self._slots.release()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

class Database:
    """A list of database nodes with one connection pool each; the first healthy node takes the work."""

    def __init__(self, config: DatabaseConfig, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._config = config
        self._password = read_secret(config.password_file, config.password_env)
        # TLS to every node, verifying its certificate (name = the host part of the node address).
        self._ssl = ssl.create_default_context(cafile=str(config.tls_ca_file)) if config.tls_ca_file else None
        self._pools: dict[str, _NodePool] = {}
        # One connection per node for primary_reachable(): a status read must not queue behind transactions that
        # hold every pooled connection while Galera stalls (it would then report a stall as "no Primary node").
        self._status_pools: dict[str, _NodePool] = {}
        self._current = 0
        self._sleep = sleep
        self._status_asks: set[asyncio.Task[bool]] = set()  # primary_status() reads still finishing (see there)
        # Failing back to an earlier node (see _fail_back): when it was last checked, how often, when it last got
        # the work back, and the check running now (kept referenced; it ends on its own bound).
        self._fail_back_interval = config.fail_back_seconds
        self._fail_back_checked = time.monotonic()
        self._failed_back_at = -math.inf
        self._fail_back_check: asyncio.Task[None] | None = None
        self._healthy_since: dict[str, float] = {}  # earlier nodes found healthy, since when (checks in between too)
        self._timeout_checks: dict[str, asyncio.Future[bool]] = {}  # status reads after a timeout, one per node
        self._closed = False

    @property
    def nodes(self) -> list[str]:
        return list(self._config.nodes)

    async def close(self) -> None:
        # primary_status() reads still running end on their own bound; a connection they give back now is closed.
        # A fail-back check still running reads no further node.
        self._closed = True
        pools = [*self._pools.values(), *self._status_pools.values()]
        self._pools, self._status_pools = {}, {}
        for pool in pools:
            pool.close()

    def _pool(self, node: str, *, status: bool = False) -> _NodePool:
        """The transaction pool of `node`, or (`status`) its own one-connection pool for status reads."""
        pools = self._status_pools if status else self._pools
        pool = pools.get(node)
        if pool is None:
            host, _, port = node.rpartition(":")
            # Status connections never wait for causality: with wsrep_sync_wait=1 MariaDB makes SHOW wait too, so a
            # stalled or lagging node would not report its state (the fitness check would read a stall as silence).
            read_your_writes = self._config.sync_wait and not status
            init = f"SET SESSION {_SESSION_SQL_MODE}" + (", wsrep_sync_wait = 1" if read_your_writes else "")

            def connect() -> Awaitable[aiomysql.Connection]:
                return aiomysql.connect(
                    host=host, port=int(port), user=self._config.user, password=self._password,
                    db=self._config.database, autocommit=False, connect_timeout=self._config.connect_timeout_seconds,
                    init_command=init, charset="utf8mb4", client_flag=CLIENT.MULTI_STATEMENTS, ssl=self._ssl)

            pool = pools[node] = _NodePool(1 if status else self._config.pool_size, connect,
                                                 connect_timeout=2 * self._config.connect_timeout_seconds,
                                                 recycle_seconds=POOL_RECYCLE_SECONDS)
        return pool

    async def node_status(self, node: str, timeout: float = 2.0) -> dict[str, str]:
        """The node's wsrep status variables (lower-case names; empty when the server runs without Galera), for
        metrics. Read on the node's status connection, like primary_status: not queued behind transactions.

        DatabaseError when the node does not answer within `timeout` seconds (connecting included).
        """
        try:
            async with asyncio.timeout(timeout):
                status = await self._wsrep_status(node, timeout)
        except (TimeoutError, _AcquireTimeout, pymysql.err.MySQLError, OSError) as exc:
            raise DatabaseError(f"database node {node} did not answer a status query: {exc}", {"node": node}) from exc
        return status or {}

    async def node_variables(self, node: str, names: Sequence[str], timeout: float = 5.0) -> dict[str, str]:
        """The node's global server variables `names` (lower-case), read on its status connection (`hapki db
        check`'s durability settings). DatabaseError when the node does not answer within `timeout` seconds."""

        async def read(cur: aiomysql.Cursor) -> dict[str, str]:
            await cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({', '.join(['%s'] * len(names))})",
                              tuple(names))
            return {str(name).lower(): str(value) for name, value in await cur.fetchall()}

        try:
            async with asyncio.timeout(timeout):
                return await self._on_status_connection(node, timeout, read)
        except (TimeoutError, _AcquireTimeout, pymysql.err.MySQLError, OSError) as exc:
            raise DatabaseError(f"database node {node} did not answer: {exc}", {"node": node}) from exc

    async def fit(self, node: str) -> bool:
        """Whether `node` answers its status within a short bound as Primary, ready and synced (or runs without
        Galera): the rule the pool fails back by, for callers that pick a node themselves (`hapki db backup`)."""
        return await self._status_fit(node)

    async def _wsrep_status(self, node: str, timeout: float) -> dict[str, str] | None:
        """The node's wsrep status variables (lower-case names), None when it runs without Galera (wsrep_on OFF).
        Driver errors propagate."""

        async def read(cur: aiomysql.Cursor) -> dict[str, str] | None:
            # SHOW is answered by a non-Primary node too (other statements get 1047 there).
            await cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name = 'wsrep_on'")
            if dict(await cur.fetchall()).get("wsrep_on", "OFF") != "ON":
                return None
            await cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_state', "
                              "'wsrep_cluster_status', 'wsrep_cluster_size', 'wsrep_ready')")
            return {str(name).lower(): str(value) for name, value in await cur.fetchall()}

        return await self._on_status_connection(node, timeout, read)

    async def _on_status_connection(self, node: str, timeout: float,
                                    read: Callable[[aiomysql.Cursor], Awaitable[T]]) -> T:
        """`read` on the node's own status connection: no wsrep_sync_wait (a lagging or stalled node still reports
        its state) and not queued behind transactions holding the pool. Driver errors propagate."""
        pool = self._pool(node, status=True)
        conn = await pool.acquire(timeout)
        broken = True
        try:
            async with conn.cursor() as cur:
                result = await read(cur)
            await conn.rollback()
            broken = False
        finally:
            pool.release(conn, broken=broken)
        return result

    def _fail_over(self, node: str) -> None:
        nodes = self._config.nodes
        if nodes[self._current % len(nodes)] == node:
            now = time.monotonic()
            if now - self._failed_back_at < FAIL_BACK_FLAP_SECONDS:
                # The node given the work back failed again soon: check less often (a node that answers its status
                # but not its transactions would otherwise cost a timeout every interval).
                self._fail_back_interval = min(2 * self._fail_back_interval, FAIL_BACK_MAX_SECONDS)
            else:
                self._fail_back_interval = self._config.fail_back_seconds
            self._fail_back_checked = now
            self._healthy_since.clear()  # a new failure: health seen before it is no evidence any more
            self._current = (self._current + 1) % len(nodes)
            log.warning("database node %s unusable; switching to %s", node, nodes[self._current])

    def _maybe_fail_back(self) -> None:
        """On a node after the first, start a check whether an earlier one is healthy again, at most every
        fail-back interval and one at a time, in the background (the transaction does not wait for it)."""
        if self._current % len(self._config.nodes) == 0 or self._fail_back_check is not None:
            return
        now = time.monotonic()
        if now - self._fail_back_checked < self._fail_back_interval:
            return
        self._fail_back_checked = now
        self._fail_back_check = asyncio.ensure_future(self._fail_back())
        self._fail_back_check.add_done_callback(self._fail_back_done)

    async def _fail_back(self) -> None:
        """Give the work back to the first node before the current one that is healthy, and was on the check before
        too (at least one interval earlier): Primary, ready and synced (a node still joining or donating is not).
        A node that has just rejoined reports itself synced while the cluster may still be settling, hence the two
        checks (a precaution: the one timeout seen after an immediate fail-back in the db-node-kill scenario had
        begun before it). Every service lists the nodes in the same order, so after a failure every one of them
        writes on the same node again; one that stayed on another after a timeout of its own (a slow transaction,
        not a dead node) would otherwise write there for good, and writers on two Galera nodes conflict at
        certification (brute-force aborts, retries)."""
        nodes = self._config.nodes
        current = self._current % len(nodes)
        for index, node in enumerate(nodes[:current]):
            if self._closed:
                return
            try:
                async with asyncio.timeout(FAIL_BACK_STATUS_TIMEOUT):
                    status = await self._wsrep_status(node, FAIL_BACK_STATUS_TIMEOUT)
            except (TimeoutError, _AcquireTimeout, pymysql.err.MySQLError, OSError) as exc:
                log.debug("fail-back check of %s: %s", node, exc)
                self._healthy_since.pop(node, None)
                continue
            if not _fit(status):
                self._healthy_since.pop(node, None)
                continue
            now = time.monotonic()
            since = self._healthy_since.setdefault(node, now)
            if now - since < self._fail_back_interval:
                log.info("database node %s is healthy; it gets the work back if it still is on the next check", node)
                return
            if self._current % len(nodes) == current:  # unless a failure moved it meanwhile
                self._current, self._failed_back_at = index, now
                self._healthy_since.clear()
                log.warning("database node %s healthy again; switching back from %s", node, nodes[current])
            return

    async def _fit_after_timeout(self, node: str) -> bool:
        """After a transaction timed out on `node`: whether it answers a status read within TIMEOUT_STATUS_SECONDS
        as Primary, ready and synced. One read per node at a time, shared by every transaction that timed out there
        meanwhile (under load many do at once)."""
        check = self._timeout_checks.get(node)
        if check is None:
            check = self._timeout_checks[node] = asyncio.ensure_future(self._status_fit(node))
            # A new check for the node starts only once this one is gone from the map.
            check.add_done_callback(lambda _: self._timeout_checks.pop(node, None))
        return await asyncio.shield(check)

    async def _status_fit(self, node: str) -> bool:
        try:
            async with asyncio.timeout(TIMEOUT_STATUS_SECONDS):
                return _fit(await self._wsrep_status(node, TIMEOUT_STATUS_SECONDS))
        except (TimeoutError, _AcquireTimeout, pymysql.err.MySQLError, OSError) as exc:
            log.info("database node %s did not answer a status read: %s", node, exc or type(exc).__name__)
            return False

    def _fail_back_done(self, task: asyncio.Task[None]) -> None:
        self._fail_back_check = None
        if not task.cancelled() and task.exception() is not None:
            log.error("fail-back check failed", exc_info=task.exception())

    async def primary_status(self, timeout: float) -> str:
        """Whether a node this process reaches is in Galera's Primary component, asking all nodes at once.

        "primary": some node says so. "not_primary": none does, and at least one answered otherwise (non-Primary,
        refused, an error). "unknown": nothing answered within `timeout` (a starved host looks like this too, so
        callers should not act on one such answer). A status read on its own connection per node, not a
        transaction: a Primary node answers it during a cluster-wide stall too (a node lost and not yet evicted),
        so every member sees "primary" then. A server without Galera (wsrep_on OFF) counts as Primary.
        """
        async def ask(node: str) -> bool:
            status = await self._wsrep_status(node, timeout)
            return status is None or (status.get("wsrep_cluster_status"), status.get("wsrep_ready")) == ("Primary", "ON")

        # Each read is bounded on its own, and the ones still running when the answer is known are not cancelled:
        # cancelling a read closes its connection, and the next check (keepalived asks CARA every second) opened a
        # new TLS connection to every slower node: about 4 a second for an idle CARA pair.
        asks = [asyncio.create_task(asyncio.wait_for(ask(node), timeout)) for node in self._config.nodes]
        for task in asks:
            self._status_asks.add(task)
            task.add_done_callback(self._status_asked)
        answered = False
        try:
            for done in asyncio.as_completed(asks, timeout=timeout):
                try:
                    if await done:
                        return "primary"
                    answered = True
                except (pymysql.err.Error, ConnectionRefusedError) as exc:
                    answered = True
                    log.debug("primary check: %s", exc)
                except (_AcquireTimeout, TimeoutError, OSError) as exc:
                    log.debug("primary check: %s", exc)
        except TimeoutError:
            pass
        return "not_primary" if answered else "unknown"

    def _status_asked(self, task: asyncio.Task[bool]) -> None:
        """A primary_status() read is over; if the call had returned before it, its outcome no longer matters."""
        self._status_asks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here, so asyncio does not report it as never retrieved

    async def run(self, body: Body[T], *, name: str, fence: Fence | None = None, timeout: float | None = None) -> T:
        """Run `body` in one transaction, retrying it whole on conflicts and on another node on failures.

        With `fence`, the transaction commits only under that epoch, else raises FencedOut (nothing committed); and
        only if the body's fence_guard conditions hold, else raises GuardFailed (nothing committed).
        `timeout` bounds one attempt once it holds a connection (default: transaction_timeout_seconds).
        """
        bound = self._config.transaction_timeout_seconds if timeout is None else timeout
        self._maybe_fail_back()
        with telemetry.span(tracer, "db.commit", attributes={"db.system": "mariadb", "db.txn": name}) as span:
            last: BaseException | None = None
            stayed: set[str] = set()  # nodes this transaction timed out on once and was retried on
            for attempt in range(self._config.max_attempts):
                node = self._config.nodes[self._current % len(self._config.nodes)]
                span.set_attribute("db.node", node)
                try:
                    return await self._run_once(node, body, fence, bound)
                except _AcquireTimeout as exc:
                    # Every connection of this node's pool is busy: overload, not a failed node. Moving the work
                    # to another node would only add Galera certification conflicts; try again here.
                    last = exc
                    log.warning("transaction %s waited over %.1f s for a connection to %s; retrying", name,
                                self._config.acquire_timeout_seconds, node)
                    span.add_event("acquire_timeout", {"attempt": attempt + 1, "node": node})
                    continue
                except TimeoutError as exc:
                    # The attempt held a connection and got no answer in time: the node died or was cut off, or
                    # it only stalls (a Galera reconfiguration stalls every node alike) or was slow under load. Its
                    # connection was closed on the way out; the pool stays (its other connections may carry healthy
                    # transactions). A node that still answers its status as fit gets the retry once: moving on
                    # would gain nothing in a stall and would make this process write on another node than every
                    # other service (Galera certification conflicts) until it fails back.
                    last = exc
                    span.add_event("timeout", {"attempt": attempt + 1, "node": node})
                    if (not isinstance(exc, _ConnectTimeout) and node not in stayed
                            and await self._fit_after_timeout(node)):
                        stayed.add(node)
                        log.warning("transaction %s on %s took over %.1f s; the node answers as fit, retrying there",
                                    name, node, bound)
                        continue
                    log.warning("transaction %s on %s took over %.1f s; retrying on another node", name, node, bound)
                    self._fail_over(node)
                    continue
                except pymysql.err.IntegrityError as exc:
                    if _errno(exc) == ER_DUP_ENTRY:
                        raise DuplicateKey(str(exc.args[1] if len(exc.args) > 1 else exc)) from None
                    raise Internal(f"integrity error in {name}") from exc
                except (pymysql.err.OperationalError, pymysql.err.InternalError, pymysql.err.InterfaceError,
                        OSError, CommitOutcomeUnknown) as exc:
                    last = exc
                    code = _errno(exc)
                    if code in RETRY_SAME_NODE:
                        delay = min(0.2, 0.005 * 2**attempt) * (0.5 + random.random())
                    else:
                        self._fail_over(node)
                        delay = min(1.0, 0.05 * 2**attempt)
                    span.add_event("retry", {"attempt": attempt + 1, "errno": code or 0, "node": node})
                    log.info("transaction %s attempt %d on %s failed (%s); retrying", name, attempt + 1, node, exc)
                    await self._sleep(delay)
                except pymysql.err.Error as exc:
                    raise Internal(f"database error in {name}: {exc}") from exc
            span.set_attribute("error", True)
            raise DatabaseError(
                f"transaction {name} failed after {self._config.max_attempts} attempts: {last}") from last

    async def _run_once(self, node: str, body: Body[T], fence: Fence | None, bound: float) -> T:
        pool = self._pool(node)
        conn = await pool.acquire(self._config.acquire_timeout_seconds)
        broken = True
        try:
            # Whatever hangs from here on (a node that stopped answering, a commit stuck in a reconfiguration)
            # becomes a retry elsewhere instead of a request stuck forever.
            async with asyncio.timeout(bound), conn.cursor() as cur:
                # No BEGIN round trip: with autocommit off, the first statement opens the transaction.
                transaction = _Transaction(fenced=fence is not None)
                token = _TRANSACTION.set(transaction)
                at_the_fence = False  # whether the result being read is the fence's
                try:
                    result = await body(cur)
                    if fence is not None:
                        statements, args = transaction.fence_round_trip(fence)
                        at_the_fence = False
                        await cur.execute("; ".join(statements), tuple(args))
                        # The results of the before_fence statements and the savepoint, then the fence's.
                        for left in range(len(transaction.before_fence) + 1, 0, -1):
                            at_the_fence = left == 1
                            await cur.nextset()
                        at_the_fence = False
                except pymysql.err.IntegrityError as exc:
                    broken = not await _rollback_quietly(conn)
                    if at_the_fence and _errno(exc) == ER_BAD_NULL_ERROR:
                        assert fence is not None
                        if transaction.guards:
                            held = None if broken else await _epoch_held(conn)
                            broken = held is None
                            # A dead connection cannot say which: the caller's careful path runs the fence again.
                            if held is not False:
                                raise GuardFailed("a fence guard was false; nothing committed") from None
                        raise FencedOut(f"epoch {fence.epoch} is no longer current for tier {fence.tier}",
                                        {"tier": fence.tier, "epoch": fence.epoch}) from None
                    raise
                except asyncio.CancelledError:
                    # Timed out (or shut down): the connection may be stuck mid-read; a ROLLBACK could hang the same
                    # way. Close it instead (the server rolls back a transaction whose connection is gone).
                    raise
                except BaseException:
                    # A clean rollback leaves the connection reusable (conflicts, duplicates, business errors).
                    broken = not await _rollback_quietly(conn)
                    raise
                finally:
                    _TRANSACTION.reset(token)
                try:
                    if fence is not None:
                        # The results of the at_fence statements, the RELEASE and the COMMIT: their errors surface
                        # here (1305 from the RELEASE: the cluster rolled the transaction back, nothing committed).
                        for _ in range(len(transaction.at_fence) + 2):
                            await cur.nextset()
                    elif not transaction.committed or conn.get_transaction_status():
                        # Unless the body folded its COMMIT (execute_many) and wrote nothing after it.
                        await conn.commit()
                except pymysql.err.IntegrityError:
                    # A statement after the fence failed (a duplicate key): MariaDB ran none after it, COMMIT
                    # included. A clean rollback keeps the connection.
                    broken = not await _rollback_quietly(conn)
                    raise
                except (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError) as exc:
                    if _errno(exc) in RETRY_SAME_NODE:
                        broken = not await _rollback_quietly(conn)
                        raise
                    raise CommitOutcomeUnknown(f"connection lost during COMMIT on {node}: {exc}") from exc
            broken = False
            return result
        finally:
            pool.release(conn, broken=broken)


def _fit(status: dict[str, str] | None) -> bool:
    """A node's wsrep status (None: a server without Galera) says it can take the work: Primary, ready, synced."""
    return status is None or (status.get("wsrep_cluster_status"), status.get("wsrep_ready"),
                              status.get("wsrep_local_state")) == ("Primary", "ON", GALERA_SYNCED)


class _AcquireTimeout(Exception):
    """No pooled connection became free in time (overload); retried on the same node."""


class _ConnectTimeout(TimeoutError):
    """A new connection's handshake did not finish in time: the node does not answer, so it is left at once."""


async def _epoch_held(conn: aiomysql.Connection) -> bool | None:
    """After a guarded fence failed (and was rolled back): whether its epoch held, so that a guard refused; None
    when the connection failed (the caller discards it)."""
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT @hapki_epoch_ok")
            row = await cur.fetchone()
        await conn.rollback()  # the read's own transaction
    except (pymysql.err.Error, OSError) as exc:
        log.debug("reading the fence's epoch check failed: %s", exc)
        return None
    return row is not None and row[0] == 1


async def _rollback_quietly(conn: aiomysql.Connection) -> bool:
    """Roll back; False means the connection is dead, which the caller handles by discarding it."""
    try:
        await conn.rollback()
    except (pymysql.err.Error, OSError) as exc:
        log.debug("rollback failed: %s", exc)
        return False
    return True


def db_time(value: datetime) -> datetime:
    """A timezone-aware time as stored: DATETIME columns hold naive UTC."""
    return value.astimezone(UTC).replace(tzinfo=None)


def utc(value: datetime | None) -> datetime | None:
    """A stored (naive UTC) time as an aware datetime; NULL stays None."""
    return value.replace(tzinfo=UTC) if value is not None else None
