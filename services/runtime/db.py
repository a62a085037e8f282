"""MariaDB/Galera access: a pool per node, whole-transaction retries, node failover, typed errors.

Callers pass a transaction body `async def body(cur) -> T`; `Database.run` owns BEGIN/COMMIT, retries and
error mapping. Bodies must be idempotent: after a connection dies during COMMIT the outcome is unknown and
the body runs again, so it should look for its own earlier effect first (see FIELD-NOTES: 1180/2013).
No driver exception leaves this module.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomysql
import pymysql.err
from opentelemetry import trace

from hapki.contracts.errors import CommitOutcomeUnknown, DatabaseError, DuplicateKey, Internal
from hapki.runtime.config import DatabaseConfig, read_secret

log = logging.getLogger("hapki.db")
tracer = trace.get_tracer("hapki.db")
T = TypeVar("T")
Body = Callable[[aiomysql.Cursor], Awaitable[T]]

# MariaDB / client error numbers (FIELD-NOTES, Galera section).
ER_DUP_ENTRY = 1062
ER_LOCK_DEADLOCK = 1213  # also Galera certification conflicts: retry the whole transaction
ER_LOCK_WAIT_TIMEOUT = 1205
ER_UNKNOWN_COM_ERROR = 1047  # Galera: node not ready / non-Primary
ER_ERROR_DURING_COMMIT = 1180
ER_QUERY_INTERRUPTED = 1317
CR_CONN_HOST_ERROR = 2003
CR_SERVER_GONE = 2006
CR_SERVER_LOST = 2013
RETRY_SAME_NODE = {ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT}
NODE_DOWN = {ER_UNKNOWN_COM_ERROR, CR_CONN_HOST_ERROR, CR_SERVER_GONE, CR_SERVER_LOST, ER_QUERY_INTERRUPTED, 1053, 1927}


def _errno(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class Database:
    """A list of database nodes with one aiomysql pool each; the first healthy node takes the work."""

    def __init__(self, config: DatabaseConfig, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._config = config
        self._password = read_secret(config.password_file, config.password_env)
        self._pools: dict[str, aiomysql.Pool] = {}
        self._current = 0
        self._sleep = sleep
        self._lock = asyncio.Lock()

    @property
    def nodes(self) -> list[str]:
        return list(self._config.nodes)

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
            await pool.wait_closed()

    async def _pool(self, node: str) -> aiomysql.Pool:
        async with self._lock:
            pool = self._pools.get(node)
            if pool is None:
                host, _, port = node.rpartition(":")
                init = "SET SESSION wsrep_sync_wait=1" if self._config.sync_wait else None
                pool = await aiomysql.create_pool(
                    minsize=0,
                    maxsize=self._config.pool_size,
                    host=host,
                    port=int(port),
                    user=self._config.user,
                    password=self._password,
                    db=self._config.database,
                    autocommit=False,
                    connect_timeout=self._config.connect_timeout_seconds,
                    init_command=init,
                    charset="utf8mb4",
                    pool_recycle=3600,
                )
                self._pools[node] = pool
            return pool

    def _fail_over(self, node: str) -> None:
        nodes = self._config.nodes
        if nodes[self._current % len(nodes)] == node:
            self._current = (self._current + 1) % len(nodes)
            log.warning("database node %s unusable; switching to %s", node, nodes[self._current])

    async def run(self, body: Body[T], *, name: str) -> T:
        """Run `body` in one transaction, retrying it whole on conflicts and on another node on failures."""
        with tracer.start_as_current_span("db.commit", attributes={"db.system": "mariadb", "db.txn": name}) as span:
            last: BaseException | None = None
            for attempt in range(self._config.max_attempts):
                node = self._config.nodes[self._current % len(self._config.nodes)]
                span.set_attribute("db.node", node)
                try:
                    return await self._run_once(node, body)
                except pymysql.err.IntegrityError as exc:
                    if _errno(exc) == ER_DUP_ENTRY:
                        raise DuplicateKey(str(exc.args[1] if len(exc.args) > 1 else exc)) from None
                    raise Internal(f"integrity error in {name}") from exc
                except (pymysql.err.OperationalError, pymysql.err.InternalError, pymysql.err.InterfaceError,
                        OSError, asyncio.TimeoutError, CommitOutcomeUnknown) as exc:
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
            raise DatabaseError(f"transaction {name} failed after {self._config.max_attempts} attempts: {last}")

    async def _run_once(self, node: str, body: Body[T]) -> T:
        pool = await self._pool(node)
        conn: aiomysql.Connection = await pool.acquire()
        broken = True
        try:
            async with conn.cursor() as cur:
                await conn.begin()
                try:
                    result = await body(cur)
                except BaseException:
                    # A clean rollback leaves the connection reusable (conflicts, duplicates, business errors).
                    broken = not await _rollback_quietly(conn)
                    raise
            try:
                await conn.commit()
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError) as exc:
                if _errno(exc) in RETRY_SAME_NODE:
                    raise
                raise CommitOutcomeUnknown(f"connection lost during COMMIT on {node}: {exc}") from exc
            broken = False
            return result
        finally:
            if broken:
                conn.close()
            pool.release(conn)


async def _rollback_quietly(conn: aiomysql.Connection) -> bool:
    """Roll back; False means the connection is dead, which the caller handles by discarding it."""
    try:
        await conn.rollback()
    except (pymysql.err.Error, OSError) as exc:
        log.debug("rollback failed: %s", exc)
        return False
    return True


async def fetch_one(cur: aiomysql.Cursor, sql: str, args: Any = None) -> tuple[Any, ...] | None:
    await cur.execute(sql, args)
    return await cur.fetchone()
