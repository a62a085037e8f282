"""The database adapter against a real MariaDB: retries, node failover, error mapping, migrations."""

from __future__ import annotations

import asyncio

import pytest

from hapki.contracts.errors import DatabaseError, DuplicateKey, Internal
from hapki.lab import stack
from hapki.lab.local import LocalEnv, free_port
from hapki.runtime.db import Database
from hapki.runtime.migrate import available, migrate
from helpers.relay import Relay
from integration.conftest import own_statements

pytestmark = pytest.mark.integration


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
async def db(env: LocalEnv):
    database = Database(stack.database_config(env))
    # A fresh, empty table every test (IF NOT EXISTS would leave a "Table 'scratch' already exists" note behind).
    await database.run(lambda cur: cur.execute(
        "CREATE OR REPLACE TABLE scratch (id INT PRIMARY KEY, v INT NOT NULL)"), name="t.create")
    try:
        yield database
    finally:
        await database.close()


async def test_migrations_apply_once_and_are_recorded(env: LocalEnv) -> None:
    database = Database(stack.database_config(env))
    try:
        await migrate(database)
        assert await migrate(database) == []  # second run: nothing to do

        async def versions(cur):
            await cur.execute("SELECT version FROM schema_migrations ORDER BY version")
            return [r[0] for r in await cur.fetchall()]

        assert await database.run(versions, name="t.versions") == [v for v, _, _ in available()]
    finally:
        await database.close()


async def test_a_dead_node_first_in_the_list_fails_over_to_the_next(env: LocalEnv) -> None:
    cfg = stack.database_config(env)
    cfg = cfg.model_copy(update={"nodes": [f"127.0.0.1:{free_port()}", *cfg.nodes]})
    database = Database(cfg, sleep=_no_sleep)
    try:
        async def one(cur):
            await cur.execute("SELECT 1")
            return (await cur.fetchone())[0]

        assert await database.run(one, name="t.failover") == 1
    finally:
        await database.close()


async def _select_one(cur) -> int:
    await cur.execute("SELECT 1")
    return (await cur.fetchone())[0]


async def _run_then_fail_back_check(database: Database) -> str:
    """A transaction (which starts a fail-back check when one is due), then that check's end: the node in use."""
    assert await database.run(_select_one, name="t.failback") == 1
    for _ in range(100):
        if database._fail_back_check is None:
            return database.nodes[database._current]
        await asyncio.sleep(0.02)
    raise AssertionError("the fail-back check did not end")


async def test_after_a_failover_the_first_node_takes_the_work_again_once_it_is_healthy(env: LocalEnv) -> None:
    """Every service lists the same nodes: after a failure they should all write on the first healthy one again,
    not stay wherever their own failover left each of them (writers on two Galera nodes conflict at certification).
    Checked in the background, at most every fail_back_seconds; given back on the second healthy check in a row, and
    checked less often while the node keeps failing."""
    real = stack.database_config(env).nodes[0]
    first = Relay(real)
    await first.start()
    cfg = stack.database_config(env).model_copy(update={
        "nodes": [first.node, real], "fail_back_seconds": 0.2, "connect_timeout_seconds": 0.5})
    database = Database(cfg, sleep=_no_sleep)
    try:
        assert await database.run(_select_one, name="t.failback") == 1
        assert first.accepted == 1 and database.nodes[database._current] == first.node
        first.stop()
        assert await database.run(_select_one, name="t.failback") == 1
        assert database.nodes[database._current] == real
        for _ in range(3):  # the first node is still down: every check fails, the work stays where it is
            await asyncio.sleep(0.25)
            assert await _run_then_fail_back_check(database) == real
        await first.start()
        await asyncio.sleep(0.25)
        # Healthy once: not yet (a node that has just rejoined Galera may still be settling).
        assert await _run_then_fail_back_check(database) == real
        await asyncio.sleep(0.25)
        assert await _run_then_fail_back_check(database) == first.node  # and still, an interval later
        accepted = first.accepted
        assert await database.run(_select_one, name="t.failback") == 1
        assert first.accepted == accepted + 1, "the transaction went through the first node again"
        first.stop()  # failing again right after getting the work back: check half as often
        assert await database.run(_select_one, name="t.failback") == 1
        assert database.nodes[database._current] == real
        assert database._fail_back_interval == 2 * cfg.fail_back_seconds
    finally:
        await database.close()
        first.stop()


async def test_health_seen_before_a_new_failure_does_not_count_towards_failing_back(env: LocalEnv) -> None:
    """On db-2 after db-1 failed, a check finds db-1 healthy once; then db-2 fails too and the work moves to db-3.
    That one healthy check must not count: db-1 gets the work back only after two checks after the new failure."""
    real = stack.database_config(env).nodes[0]
    first, second = Relay(real), Relay(real)
    await first.start()
    await second.start()
    cfg = stack.database_config(env).model_copy(update={
        "nodes": [first.node, second.node, real], "fail_back_seconds": 0.2, "connect_timeout_seconds": 0.5})
    database = Database(cfg, sleep=_no_sleep)

    try:
        assert await _run_then_fail_back_check(database) == first.node
        first.stop()
        assert await _run_then_fail_back_check(database) == second.node
        await first.start()
        await asyncio.sleep(0.25)
        assert await _run_then_fail_back_check(database) == second.node  # first healthy once
        second.stop()
        assert await _run_then_fail_back_check(database) == real  # a new failure (the check it starts is not due yet)
        await asyncio.sleep(0.25)
        assert await _run_then_fail_back_check(database) == real, "health seen before the new failure counted"
        await asyncio.sleep(0.25)
        assert await _run_then_fail_back_check(database) == first.node
    finally:
        await database.close()
        first.stop()
        second.stop()


async def test_no_reachable_node_raises_a_retryable_database_error(env: LocalEnv) -> None:
    cfg = stack.database_config(env).model_copy(update={"nodes": [f"127.0.0.1:{free_port()}"], "max_attempts": 3})
    database = Database(cfg, sleep=_no_sleep)
    try:
        with pytest.raises(DatabaseError) as info:
            await database.run(lambda cur: cur.execute("SELECT 1"), name="t.down")
        assert info.value.retryable
    finally:
        await database.close()


async def test_deadlocks_are_retried_as_whole_transactions(db: Database) -> None:
    await db.run(lambda cur: cur.executemany("INSERT INTO scratch VALUES (%s, 0)", [(1,), (2,)]), name="t.seed")
    gate = asyncio.Barrier(2)
    attempts = {"a": 0, "b": 0}

    def body(first: int, second: int, tag: str):
        async def run(cur):
            attempts[tag] += 1
            await cur.execute("UPDATE scratch SET v = v + 1 WHERE id = %s", (first,))
            if attempts[tag] == 1:
                await gate.wait()  # both hold their first row lock: opposite order -> deadlock
            await cur.execute("UPDATE scratch SET v = v + 1 WHERE id = %s", (second,))
        return run

    await asyncio.gather(db.run(body(1, 2, "a"), name="t.a"), db.run(body(2, 1, "b"), name="t.b"))
    assert attempts["a"] + attempts["b"] == 3  # exactly one victim, retried once

    async def values(cur):
        await cur.execute("SELECT v FROM scratch ORDER BY id")
        return [r[0] for r in await cur.fetchall()]

    assert await db.run(values, name="t.values") == [2, 2]  # both transactions applied exactly once


async def test_duplicates_and_sql_errors_map_to_project_errors(db: Database) -> None:
    await db.run(lambda cur: cur.execute("INSERT INTO scratch VALUES (7, 0)"), name="t.ins")
    with pytest.raises(DuplicateKey):
        await db.run(lambda cur: cur.execute("INSERT INTO scratch VALUES (7, 1)"), name="t.dup")
    with pytest.raises(Internal):
        await db.run(lambda cur: cur.execute("SELEKT nonsense"), name="t.syntax")


async def test_bytes_and_string_arguments_round_trip_exactly(db: Database) -> None:
    # aiomysql 0.3.2 with PyMySQL >= 1.2.3 raised TypeError on any bytes argument, and strings are escaped by
    # hapki.runtime.db's own function: both must reach the server as the value they are.
    every_byte = bytes(range(256)) + b"'\\\"%s\x00"
    text = "".join(chr(c) for c in range(1, 128)) + "\\'\"\0\n\r\x1a%s é ✓ 😀" + "-----BEGIN\nMIIB\n" * 40

    async def round_trip(cur):
        await cur.execute("CREATE OR REPLACE TABLE scratch_values (id INT PRIMARY KEY, b VARBINARY(512) NOT NULL,"
                          " t TEXT CHARACTER SET utf8mb4 NOT NULL)")
        await cur.execute("INSERT INTO scratch_values VALUES (%s, %s, %s)", (1, every_byte, text))
        await cur.execute("SELECT b, t FROM scratch_values WHERE b = %s AND t = %s", (every_byte, text))
        return await cur.fetchone()

    assert await db.run(round_trip, name="t.values") == (every_byte, text)


async def test_a_failing_body_rolls_back_everything(db: Database) -> None:
    async def half(cur):
        await cur.execute("INSERT INTO scratch VALUES (9, 0)")
        raise DuplicateKey("simulated failure after the first write")

    with pytest.raises(DuplicateKey):
        await db.run(half, name="t.half")

    async def count(cur):
        await cur.execute("SELECT COUNT(*) FROM scratch WHERE id = 9")
        return (await cur.fetchone())[0]

    assert await db.run(count, name="t.count") == 0


async def _fresh_epoch(db: Database, tier: str, *, epoch: int, fence_seq: int) -> None:
    """Tier `tier` at `epoch`, its fence sequence at `fence_seq`, whatever an earlier run left."""

    async def setup(cur):
        await cur.execute("DELETE FROM epochs WHERE tier = %s", (tier,))
        await cur.execute("INSERT INTO epochs (tier, epoch, holder, fence_seq, updated_at)"
                          " VALUES (%s, %s, 'x', %s, NOW())", (tier, epoch, fence_seq))

    await db.run(setup, name="t.epoch")


async def test_a_fenced_transaction_commits_only_under_the_current_epoch(db: Database) -> None:
    from hapki.contracts.errors import FencedOut
    from hapki.runtime.db import Fence

    await _fresh_epoch(db, "test", epoch=5, fence_seq=0)

    def write(row: int):
        async def body(cur):
            await cur.execute("INSERT INTO scratch VALUES (%s, 0)", (row,))
        return body

    await db.run(write(100), name="t.current", fence=Fence("test", 5))
    with pytest.raises(FencedOut):
        await db.run(write(101), name="t.stale", fence=Fence("test", 4))

    async def state(cur):
        await cur.execute("SELECT id FROM scratch WHERE id IN (100, 101)")
        ids = [r[0] for r in await cur.fetchall()]
        await cur.execute("SELECT fence_seq FROM epochs WHERE tier = 'test'")
        return ids, (await cur.fetchone())[0]

    assert await db.run(state, name="t.state") == ([100], 1)  # the stale write left nothing behind


async def test_statements_at_the_fence_see_its_sequence_number_and_their_errors_roll_everything_back(
        db: Database) -> None:
    from hapki.runtime.db import Fence, at_fence

    await _fresh_epoch(db, "test3", epoch=1, fence_seq=40)

    def numbered(ids: tuple[int, ...]):
        async def body(cur):
            await cur.execute("INSERT INTO scratch VALUES (%s, 0)", (ids[0] + 100,))  # before the fence
            at_fence("INSERT INTO scratch VALUES " + ", ".join(["(%s, @hapki_fence_seq)"] * len(ids)), ids)
        return body

    await db.run(numbered((300, 301)), name="t.at_fence", fence=Fence("test3", 1))
    with pytest.raises(DuplicateKey):  # 301 exists: nothing of this transaction is committed, 402 neither
        await db.run(numbered((302, 301)), name="t.at_fence_duplicate", fence=Fence("test3", 1))
    with pytest.raises(Internal, match="at_fence"):
        await db.run(numbered((303,)), name="t.at_fence_unfenced")

    async def rows(cur):
        await cur.execute("SELECT id, v FROM scratch WHERE id BETWEEN 300 AND 409 ORDER BY id")
        found = [tuple(r) for r in await cur.fetchall()]
        await cur.execute("SELECT fence_seq FROM epochs WHERE tier = 'test3'")
        return found, (await cur.fetchone())[0]

    assert await db.run(rows, name="t.at_fence_rows") == ([(300, 41), (301, 41), (400, 0)], 41)


async def _scratch_ids(db: Database, lo: int, hi: int) -> list[int]:
    async def ids(cur):
        await cur.execute("SELECT id FROM scratch WHERE id BETWEEN %s AND %s ORDER BY id", (lo, hi))
        return [r[0] for r in await cur.fetchall()]

    return await db.run(ids, name="t.ids")


async def test_a_body_may_fold_its_commit_into_its_last_round_trip(db: Database) -> None:
    from hapki.runtime.db import execute_many

    seen: dict[str, object] = {}

    async def body(cur):
        counts = await execute_many(cur, [("INSERT INTO scratch VALUES (%s, 0), (%s, 0)", (200, 201)),
                                          ("UPDATE scratch SET v = 7 WHERE id = %s", (201,))], commit=True)
        seen["counts"], seen["open"] = counts, cur.connection.get_transaction_status()
        return "done"

    assert await db.run(body, name="t.folded") == "done"
    assert seen == {"counts": [(2, []), (1, [])], "open": False}  # committed by the body's own round trip
    assert await _scratch_ids(db, 200, 209) == [200, 201]

    # A duplicate key stops the statements before the COMMIT: nothing of the transaction stays.
    async def clash(cur):
        await cur.execute("INSERT INTO scratch VALUES (202, 0)")
        await execute_many(cur, [("INSERT INTO scratch VALUES (%s, 0)", (203,)),
                                 ("INSERT INTO scratch VALUES (%s, 0)", (200,))], commit=True)

    with pytest.raises(DuplicateKey):
        await db.run(clash, name="t.folded_clash")
    assert await _scratch_ids(db, 200, 209) == [200, 201]


async def test_a_read_that_folds_its_commit_ends_its_snapshot(db: Database, env: LocalEnv) -> None:
    """The next transaction on the same pooled connection sees what others committed meanwhile."""
    from hapki.runtime.db import execute_many

    async def count(cur):
        [(_, rows)] = await execute_many(cur, [("SELECT COUNT(*) FROM scratch WHERE id = %s", (220,))], commit=True)
        return rows[0][0]

    async def plain_count(cur):
        await cur.execute("SELECT COUNT(*) FROM scratch WHERE id = %s", (220,))
        return (await cur.fetchone())[0]

    assert await db.run(count, name="t.read") == 0
    assert await db.run(plain_count, name="t.read_plain") == 0
    other = Database(stack.database_config(env))
    try:
        await other.run(lambda cur: cur.execute("INSERT INTO scratch VALUES (220, 0)"), name="t.other")
    finally:
        await other.close()
    assert await db.run(count, name="t.read_again") == 1
    assert await db.run(plain_count, name="t.read_plain_again") == 1


async def test_a_fenced_body_cannot_commit_before_its_fence(db: Database) -> None:
    from hapki.contracts.errors import FencedOut
    from hapki.runtime.db import Fence, execute_many

    await _fresh_epoch(db, "test2", epoch=3, fence_seq=0)

    async def early_commit(cur):
        await execute_many(cur, [("INSERT INTO scratch VALUES (%s, 0)", (210,))], commit=True)

    for epoch in (3, 2):  # current or stale: either way the body's COMMIT is refused and nothing is written
        with pytest.raises(Internal, match="fence"):
            await db.run(early_commit, name="t.fenced_commit", fence=Fence("test2", epoch))

    async def plain(cur):  # without commit=True a fenced body's statements wait for the fence as before
        await execute_many(cur, [("INSERT INTO scratch VALUES (%s, 0)", (211,))])

    with pytest.raises(FencedOut):
        await db.run(plain, name="t.fenced_stale", fence=Fence("test2", 2))
    await db.run(plain, name="t.fenced_current", fence=Fence("test2", 3))
    assert await _scratch_ids(db, 210, 219) == [211]
    # Outside a fenced transaction the same body may commit itself again (the guard is per transaction).
    await db.run(early_commit, name="t.unfenced_commit")
    assert await _scratch_ids(db, 210, 219) == [210, 211]


async def test_a_guarded_fence_commits_only_if_its_guard_holds_and_says_which_refused(db: Database) -> None:
    """A body whose whole transaction is one round trip: statements before the fence, a guard the fence checks
    (here, the row count of the statement before it), statements after it. A false guard under the current epoch
    commits nothing and raises GuardFailed; a stale epoch is FencedOut whatever the guard."""
    from hapki.contracts.errors import FencedOut, GuardFailed
    from hapki.runtime.db import Fence, at_fence, before_fence, fence_guard

    await _fresh_epoch(db, "test4", epoch=2, fence_seq=10)
    await db.run(lambda cur: cur.execute("INSERT INTO scratch VALUES (500, 0), (501, 0)"), name="t.rows")

    def guarded(moved: int, expected: int, after: int):
        async def body(cur):
            before_fence("UPDATE scratch SET v = v + 1 WHERE id BETWEEN 500 AND %s", (499 + moved,))
            before_fence("SET @hapki_test_moved = ROW_COUNT()")
            fence_guard("@hapki_test_moved = %s", (expected,))
            at_fence("INSERT INTO scratch VALUES (%s, @hapki_fence_seq)", (after,))
        return body

    with own_statements() as statements:
        await db.run(guarded(2, 2, 510), name="t.guard_holds", fence=Fence("test4", 2))
    assert len(statements) == 1, statements  # everything, COMMIT included, in the fence's round trip
    with pytest.raises(GuardFailed):
        await db.run(guarded(1, 2, 511), name="t.guard_fails", fence=Fence("test4", 2))
    with pytest.raises(FencedOut):
        await db.run(guarded(1, 2, 512), name="t.guard_fails_stale", fence=Fence("test4", 1))
    with pytest.raises(FencedOut):
        await db.run(guarded(2, 2, 513), name="t.guard_holds_stale", fence=Fence("test4", 1))
    with pytest.raises(Internal, match="before_fence outside"):
        await db.run(guarded(2, 2, 514), name="t.guard_unfenced")

    async def rows(cur):
        await cur.execute("SELECT id, v FROM scratch WHERE id BETWEEN 500 AND 519 ORDER BY id")
        found = [tuple(r) for r in await cur.fetchall()]
        await cur.execute("SELECT fence_seq FROM epochs WHERE tier = 'test4'")
        return found, (await cur.fetchone())[0]

    assert await db.run(rows, name="t.guard_rows") == ([(500, 1), (501, 1), (510, 11)], 11)

    async def duplicate_before(cur):  # an error before the fence is the statement's own, not the fence's
        before_fence("INSERT INTO scratch VALUES (500, 0)")
        fence_guard("1 = 1")

    with pytest.raises(DuplicateKey):
        await db.run(duplicate_before, name="t.guard_duplicate", fence=Fence("test4", 2))


async def test_a_hung_attempt_is_bounded_and_retried_on_a_fresh_connection(env: LocalEnv) -> None:
    cfg = stack.database_config(env).model_copy(update={"transaction_timeout_seconds": 0.5})
    database = Database(cfg, sleep=_no_sleep)
    seen: list[int] = []
    try:
        async def body(cur):
            await cur.execute("SELECT CONNECTION_ID()")
            seen.append((await cur.fetchone())[0])
            if len(seen) == 1:
                await asyncio.sleep(5)  # a hang: a node that stopped answering mid-transaction
            return seen[-1]

        assert await database.run(body, name="t.hang") == seen[1]
        assert len(seen) == 2 and seen[0] != seen[1]  # the hung connection was closed, not reused
    finally:
        await database.close()


async def test_a_timeout_on_a_node_that_still_answers_as_fit_is_retried_there_once(env: LocalEnv, caplog) -> None:
    """A transaction that times out on a node which still answers its status read (Primary, ready, synced; here a
    server without Galera) only stalled or was slow: the retry stays on that node, so the process keeps writing
    where every other service writes. A second timeout there in the same transaction moves it on."""
    real = stack.database_config(env).nodes[0]
    second = Relay(real)
    await second.start()
    cfg = stack.database_config(env).model_copy(update={"nodes": [real, second.node],
                                                        "transaction_timeout_seconds": 0.4})
    database = Database(cfg, sleep=_no_sleep)
    attempts: list[int] = []
    try:
        async def slow_once(cur):
            await cur.execute("SELECT CONNECTION_ID()")
            attempts.append((await cur.fetchone())[0])
            if len(attempts) == 1:
                await asyncio.sleep(5)  # a stall or a slow moment
            return "done"

        assert await database.run(slow_once, name="t.slow_once") == "done"
        assert len(attempts) == 2 and attempts[0] != attempts[1]  # a fresh connection, on the same node
        assert database.nodes[database._current] == real and second.accepted == 0
        assert not [r for r in caplog.records if "switching to" in r.getMessage()]

        attempts.clear()

        async def slow_twice(cur):
            attempts.append(1)
            if len(attempts) <= 2:
                await asyncio.sleep(5)
            return await _select_one(cur)

        assert await database.run(slow_twice, name="t.slow_twice") == 1
        assert len(attempts) == 3, "retried once on the first node, then on the second"
        assert database.nodes[database._current] == second.node and second.accepted == 1
    finally:
        await database.close()
        second.stop()


async def test_a_timeout_on_a_node_that_no_longer_answers_moves_on_at_once(env: LocalEnv) -> None:
    """The node died during the transaction: its status read is refused, so the retry goes to the next node."""
    real = stack.database_config(env).nodes[0]
    first = Relay(real)
    await first.start()
    cfg = stack.database_config(env).model_copy(update={"nodes": [first.node, real],
                                                        "transaction_timeout_seconds": 0.4})
    database = Database(cfg, sleep=_no_sleep)
    attempts: list[int] = []
    try:
        async def dies(cur):
            attempts.append(1)
            if len(attempts) == 1:
                await cur.execute("SELECT 1")
                await cur.fetchall()
                first.stop()  # the node goes away mid-transaction; the client only learns of it by its bound
                await asyncio.sleep(5)
            return await _select_one(cur)

        assert await database.run(dies, name="t.dies") == 1
        assert len(attempts) == 2 and database.nodes[database._current] == real
    finally:
        await database.close()
        first.stop()


async def test_waiting_for_a_busy_pool_is_overload_not_a_node_failure(env: LocalEnv, caplog) -> None:
    # One connection, two slow transactions queued on it: the third waits longer than any one transaction may
    # take, and must retry on the same node rather than fail over (here to a node that does not exist).
    cfg = stack.database_config(env).model_copy(update={
        "pool_size": 1, "acquire_timeout_seconds": 0.2, "transaction_timeout_seconds": 0.8, "max_attempts": 20,
        "nodes": [*stack.database_config(env).nodes, "127.0.0.1:9"]})
    database = Database(cfg, sleep=_no_sleep)
    try:
        async def slow(cur):
            await cur.execute("SELECT SLEEP(0.5)")
            return "slow"

        async def quick(cur):
            await cur.execute("SELECT 1")
            return (await cur.fetchone())[0]

        slows = [asyncio.create_task(database.run(slow, name="t.slow")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert await database.run(quick, name="t.quick") == 1
        assert await asyncio.gather(*slows) == ["slow", "slow"]
        switches = [r.getMessage() for r in caplog.records if "switching to" in r.getMessage()]
        assert switches == []  # the node was never given up
    finally:
        await database.close()


async def test_a_connection_closed_after_a_hang_frees_its_slot_for_a_waiter_at_once(env: LocalEnv, caplog) -> None:
    # One connection: the first transaction hangs and is cut off (its connection closed, no retry); the second,
    # waiting for that connection, must get the freed slot then, not sleep until its own acquire timeout.
    cfg = stack.database_config(env).model_copy(update={
        "pool_size": 1, "acquire_timeout_seconds": 5.0, "transaction_timeout_seconds": 0.3, "max_attempts": 1})
    database = Database(cfg, sleep=_no_sleep)
    calls: list[str] = []
    try:
        async def hangs(cur):
            calls.append("hang")
            await asyncio.sleep(10)  # a node that stopped answering mid-transaction

        async def quick(cur):
            await cur.execute("SELECT 2")
            return (await cur.fetchone())[0]

        first = asyncio.create_task(database.run(hangs, name="t.hang"))
        await asyncio.sleep(0.05)
        began = asyncio.get_running_loop().time()
        assert await database.run(quick, name="t.waiter") == 2
        waited = asyncio.get_running_loop().time() - began
        with pytest.raises(DatabaseError):
            await first
        assert calls == ["hang"]
        assert not [r for r in caplog.records if "waited over" in r.getMessage()]
        assert waited < cfg.acquire_timeout_seconds  # the slot came back with the closed connection
    finally:
        await database.close()


async def test_a_node_that_accepts_but_never_answers_is_left_for_the_next(env: LocalEnv) -> None:
    # A listener that takes the TCP connection and never sends the MySQL greeting: a node wedged in a Galera
    # reconfiguration looks like this. The whole handshake is bounded, and the transaction moves on.
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    mute_node = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cfg = stack.database_config(env).model_copy(update={
        "nodes": [mute_node, *stack.database_config(env).nodes], "connect_timeout_seconds": 0.2})
    database = Database(cfg, sleep=_no_sleep)
    try:
        async def one(cur):
            await cur.execute("SELECT 1")
            return (await cur.fetchone())[0]

        assert await asyncio.wait_for(database.run(one, name="t.mute"), timeout=5) == 1
        assert held, "the mute node was tried first"
        assert database.nodes[database._current] != mute_node
    finally:
        await database.close()
        for writer in held:
            writer.close()
        server.close()


async def test_primary_status_is_primary_for_a_reachable_node_even_behind_a_dead_one(env: LocalEnv) -> None:
    # A server without Galera counts as Primary; the dead node first in the list does not hide the live one.
    cfg = stack.database_config(env)
    cfg = cfg.model_copy(update={"nodes": [f"127.0.0.1:{free_port()}", *cfg.nodes]})
    database = Database(cfg, sleep=_no_sleep)
    try:
        assert await database.primary_status(timeout=2.0) == "primary"
    finally:
        await database.close()


async def test_primary_status_is_unknown_within_its_bound_when_no_node_answers(env: LocalEnv) -> None:
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    nodes = [f"127.0.0.1:{server.sockets[0].getsockname()[1]}"]  # takes the connection, never answers
    database = Database(stack.database_config(env).model_copy(update={"nodes": nodes}), sleep=_no_sleep)
    try:
        began = asyncio.get_running_loop().time()
        assert await database.primary_status(timeout=0.5) == "unknown"
        assert asyncio.get_running_loop().time() - began < 2.0
    finally:
        await database.close()
        for writer in held:
            writer.close()
        server.close()


async def test_primary_status_is_not_primary_when_the_only_answers_are_refusals(env: LocalEnv) -> None:
    # A refused connection is an answer (nothing Primary there), unlike silence, which a starved host also gives.
    cfg = stack.database_config(env).model_copy(update={"nodes": [f"127.0.0.1:{free_port()}"]})
    database = Database(cfg, sleep=_no_sleep)
    try:
        assert await database.primary_status(timeout=2.0) == "not_primary"
    finally:
        await database.close()


async def test_primary_status_keeps_the_connections_of_the_slower_nodes(env: LocalEnv) -> None:
    """The first node to say Primary decides; the reads still running on the others finish instead of being cancelled,
    so their connections are reused. Cancelled, each check (keepalived asks CARA every second) opened a new TLS
    connection to every slower node."""
    [node] = stack.database_config(env).nodes
    host, _, port = node.rpartition(":")
    accepted: list[int] = []
    pipes: list[asyncio.Task[None]] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def slow_node(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        server_r, server_w = await asyncio.open_connection(host, int(port))
        pipes.extend([asyncio.create_task(pipe(client_r, server_w, 0.0)),
                      asyncio.create_task(pipe(server_r, client_w, 0.05))])  # every answer 50 ms late

    proxy = await asyncio.start_server(slow_node, "127.0.0.1", 0)
    slow = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    database = Database(stack.database_config(env).model_copy(update={"nodes": [node, slow]}), sleep=_no_sleep)
    try:
        for _ in range(10):
            assert await database.primary_status(timeout=2.0) == "primary"  # the direct node, first
            await asyncio.sleep(0.3)  # the slow node's read finishes meanwhile
        assert len(accepted) == 1, f"{len(accepted)} connections to the slower node for 10 checks"
    finally:
        await database.close()
        proxy.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
