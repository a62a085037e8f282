"""How CARA's periodic CRL reads grow with the CRLs kept: the schedule read (every `[crl] poll_seconds`, 2 s, on the
active member) and the OCSP cache's revocation poll, with 1,000 / 10,000 / 100,000 CRLs of one issuer in a private
MariaDB (hapki.lab.local.LocalEnv: the 64 MiB buffer pool of the single-node stack).

A year of the default schedule (a full CRL an hour, a delta every 5 minutes) is ~105,000 CRLs; nothing prunes them
(RFC 5280 asks that issued CRLs stay available). Only public calls of hapki, so the same file measures another
checkout: run it with that checkout's venv (session 21: 1.43 / 10.5 / 548 ms per schedule read before, 0.73 ms
flat after).

  .venv/bin/python scripts/bench_crl_growth.py [--counts 1000,10000,100000] [--calls 50] [--der-bytes 600]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import aiomysql

from hapki.cara.revocation_store import MariaDBRevocationStore
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database
from hapki.runtime.migrate import migrate

ISSUER = "bench-crl-growth"
FULL_EVERY = 12  # a full CRL every 12th: an hour of 5-minute deltas


async def fill(conn: aiomysql.Connection, first: int, last: int, der: bytes) -> None:
    """CRLs numbered first..last, 5 minutes apart, the newest now."""
    now = utcnow().replace(tzinfo=None)
    rows = [(ISSUER, n, int(n % FULL_EVERY != 0), None, 3, now - timedelta(minutes=5 * (last - n)),
             now + timedelta(days=1), der, 1, "cara-1", now) for n in range(first, last + 1)]
    async with conn.cursor() as cur:
        for start in range(0, len(rows), 2_000):
            await cur.executemany(
                "INSERT INTO crls (issuer, crl_number, is_delta, base_crl_number, entries, this_update, next_update,"
                " der, epoch, member, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows[start:start + 2_000])
        await cur.execute("ANALYZE TABLE crls")


async def per_call_ms(call: object, calls: int) -> float:
    await call()  # type: ignore[operator]
    began = time.perf_counter()
    for _ in range(calls):
        await call()  # type: ignore[operator]
    return 1000 * (time.perf_counter() - began) / calls


async def main(counts: list[int], calls: int, der_bytes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hapki-crl-growth-") as base:
        env = LocalEnv(Path(base)).start()
        try:
            db = Database(stack.database_config(env))
            await migrate(db)
            store = MariaDBRevocationStore(db)
            conn = await aiomysql.connect(**env.db.connect_kwargs(), autocommit=True)
            der = os.urandom(der_bytes)
            kept = 0
            print(f"{'CRLs':>8}  {'schedule read ms':>16}  {'OCSP revocation poll ms':>23}")
            for count in sorted(counts):
                await fill(conn, kept + 1, count, der)
                kept = count
                schedule = await per_call_ms(lambda: store.crl_schedule(ISSUER), calls)
                poll = await per_call_ms(lambda: store.revocations_since(ISSUER, kept - 1), calls)
                print(f"{kept:>8,}  {schedule:>16.2f}  {poll:>23.2f}")
            conn.close()
            await db.close()
        finally:
            env.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000,100000", help="CRLs kept at each step (comma-separated)")
    parser.add_argument("--calls", type=int, default=50, help="reads timed per step")
    parser.add_argument("--der-bytes", type=int, default=600, help="size of each stored CRL")
    args = parser.parse_args()
    asyncio.run(main([int(c) for c in args.counts.split(",")], args.calls, args.der_bytes))
