"""Client CPU per database round trip of two MySQL drivers (aiomysql on PyMySQL, asyncmy), over TLS, under uvloop.

Starts a private MariaDB with TLS (hapki.lab.local, as the integration tests do), then runs each driver in its own
child process, alternating drivers `--rounds` times, and prints the client's CPU time (time.process_time, user +
kernel; the kernel part, TCP over loopback and the syscalls, is the same for both) per operation of each workload,
the median over the rounds:

  select  one-row point SELECT (execute + fetchall): one round trip
  fetch   SELECT of 8 rows shaped like CARA's certificates (7 columns, a ~700-byte PEM, two DATETIMEs)
  batch   a CARA-like write transaction: a multi-statement INSERT of 8 rows + UPDATE (execute, nextset), then
          UPDATE fence + COMMIT in one round trip (execute, nextset): two round trips

  .venv/bin/pip install asyncmy==0.2.18   # not a dependency of hapki: only this comparison needs it
  .venv/bin/python scripts/bench_driver.py --ops 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

DRIVERS = ("aiomysql", "asyncmy")
WORKLOADS = ("select", "fetch", "batch")
SCHEMA = [
    "DROP TABLE IF EXISTS certs",
    "CREATE TABLE certs (id BIGINT PRIMARY KEY AUTO_INCREMENT, request_id CHAR(32) NOT NULL, issuer VARCHAR(64)"
    " NOT NULL, serial CHAR(40) NOT NULL, intent_id CHAR(32) NOT NULL, cert_pem TEXT NOT NULL, not_before DATETIME"
    " NOT NULL, not_after DATETIME NOT NULL, state VARCHAR(16) NOT NULL DEFAULT 'new', KEY (request_id))",
    "DROP TABLE IF EXISTS fence",
    "CREATE TABLE fence (tier VARCHAR(16) PRIMARY KEY, epoch INT NOT NULL, seq BIGINT NOT NULL)",
    "INSERT INTO fence VALUES ('cara', 1, 0)",
]
PEM = "-----BEGIN CERTIFICATE-----\n" + ("A" * 64 + "\n") * 10 + "-----END CERTIFICATE-----\n"


async def _connect(driver: str, kwargs: dict[str, Any]) -> Any:
    common = dict(host=kwargs["host"], port=kwargs["port"], user=kwargs["user"], password=kwargs["password"],
                  autocommit=False, charset="utf8mb4", ssl=kwargs["ssl"],
                  init_command="SET SESSION sql_mode = 'STRICT_ALL_TABLES'")
    if driver == "aiomysql":
        import aiomysql
        from pymysql.constants import CLIENT

        return await aiomysql.connect(db=kwargs["db"], client_flag=CLIENT.MULTI_STATEMENTS, **common)
    import asyncmy
    from asyncmy.constants import CLIENT

    return await asyncmy.connect(database=kwargs["db"], client_flag=CLIENT.MULTI_STATEMENTS, **common)


async def _workload(conn: Any, name: str, ops: int) -> tuple[float, float]:
    """CPU seconds (all, and in the kernel) for `ops` operations of workload `name` on `conn`, after a warm-up."""
    now = datetime(2026, 11, 26, 12, 0, 0)
    counter = iter(range(10**9))

    async def select(cur: Any) -> None:
        await cur.execute("SELECT id, state FROM certs WHERE id = %s", (1,))
        await cur.fetchall()

    async def fetch(cur: Any) -> None:
        await cur.execute("SELECT request_id, issuer, serial, intent_id, cert_pem, not_before, not_after FROM certs"
                          " WHERE id BETWEEN %s AND %s", (1, 8))
        assert len(await cur.fetchall()) == 8

    async def batch(cur: Any) -> None:
        n = next(counter)
        rows = [(f"{n:016x}{i:016x}", "issuer-a", f"{n:020x}{i:020x}", f"{i:016x}{n:016x}", PEM, now,
                 now + timedelta(days=90)) for i in range(8)]
        await cur.execute(
            "INSERT INTO certs (request_id, issuer, serial, intent_id, cert_pem, not_before, not_after) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(rows))
            + "; UPDATE certs SET state = 'issued' WHERE request_id IN (" + ", ".join(["%s"] * len(rows)) + ")",
            (*(v for row in rows for v in row), *(row[0] for row in rows)))
        await cur.fetchall()
        await cur.nextset()
        assert cur.rowcount == 8
        await cur.execute("UPDATE fence SET seq = IF(epoch = %s, seq + 1, NULL) WHERE tier = %s; COMMIT", (1, "cara"))
        await cur.nextset()

    step = {"select": select, "fetch": fetch, "batch": batch}[name]
    async with conn.cursor() as cur:
        for _ in range(min(500, ops)):
            await step(cur)
        await conn.rollback()
        start, kernel = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        for _ in range(ops):
            await step(cur)
        spent = time.process_time() - start
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel
        await conn.rollback()
    return spent, kernel


async def _child(driver: str, kwargs: dict[str, Any], ops: dict[str, int]) -> dict[str, float]:
    kwargs = {**kwargs, "ssl": ssl.create_default_context(cafile=kwargs.pop("ca_file"))}
    conn = await _connect(driver, kwargs)
    try:
        result = {}
        for name, count in ops.items():
            spent, kernel = await _workload(conn, name, count)
            result[name], result[f"{name}_sys"] = spent / count * 1e6, kernel / count * 1e6
        return result
    finally:
        conn.close()


def _child_main(argv: list[str]) -> None:
    [driver] = argv
    parsed = json.loads(sys.stdin.read())  # on stdin: the password stays out of process listings
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(_child(driver, parsed["connect"], parsed["ops"]))))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20000, help="operations per workload (batch: a fifth of it)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the drivers")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    args = parser.parse_args()

    from hapki.lab.local import MariaDB, TlsFiles, root_sql

    drivers = args.drivers.split(",")
    for driver in drivers:
        if importlib.util.find_spec(driver) is None:
            raise SystemExit(f"{driver} is not installed in this venv: .venv/bin/pip install {driver}"
                             + ("==0.2.18" if driver == "asyncmy" else ""))
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        base = Path(tmp)
        db = MariaDB(base)
        db.tls = TlsFiles.issue(base / "tls", "localhost", ["127.0.0.1"], ["localhost"])
        db.start()
        try:
            root_sql(db.socket, "CREATE DATABASE IF NOT EXISTS hapki_bench; USE hapki_bench; " + "; ".join(SCHEMA))
            root_sql(db.socket, "USE hapki_bench; INSERT INTO certs (request_id, issuer, serial, intent_id, cert_pem,"
                                " not_before, not_after) VALUES " + ", ".join(
                                    f"('s{i:031x}', 'issuer-a', '{i:040x}', '{i:032x}', '{PEM}', NOW(), NOW())"
                                    for i in range(1, 9)))
            kwargs = db.connect_kwargs()
            connect = {"host": kwargs["host"], "port": kwargs["port"], "user": kwargs["user"],
                       "password": kwargs["password"], "db": "hapki_bench", "ca_file": str(db.tls.ca_file)}
            ops = {"select": args.ops, "fetch": args.ops, "batch": max(1, args.ops // 5)}
            results: dict[str, list[dict[str, float]]] = {d: [] for d in drivers}
            for _ in range(args.rounds):
                for driver in drivers:
                    out = subprocess.run([sys.executable, __file__, "--child", driver],
                                         input=json.dumps({"connect": connect, "ops": ops}), capture_output=True,
                                         text=True, env={**os.environ}, timeout=1800)
                    if out.returncode != 0:
                        raise SystemExit(f"{driver} failed:\n{out.stderr[-3000:]}")
                    results[driver].append(json.loads(out.stdout))
        finally:
            db.stop()
    print(f"client CPU us per operation (median of {args.rounds} rounds; ops: {ops}); TLS, uvloop")
    print(f"{'workload':10}" + "".join(f"{d:>12}" for d in drivers)
          + ("   change" if len(drivers) == 2 else ""))
    for name in WORKLOADS:
        medians = [statistics.median(r[name] for r in results[d]) for d in drivers]
        line = f"{name:10}" + "".join(f"{m:12.1f}" for m in medians)
        if len(drivers) == 2:
            line += f"   {(medians[1] / medians[0] - 1) * 100:+6.0f}%"
        print(line + "   (of which kernel: " + ", ".join(
            f"{statistics.median(r[name + '_sys'] for r in results[d]):.1f}" for d in drivers) + ")")
    print("all rounds:", json.dumps({d: [{k: round(v, 1) for k, v in r.items()} for r in rs]
                                      for d, rs in results.items()}))


if __name__ == "__main__":
    main()
