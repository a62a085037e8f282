"""CRL generation time with N revoked entries on the local stack (real MariaDB and SoftHSM). Not a test.

    .venv/bin/python scripts/bench_crl.py [N]

Prints the time of: the pure build + HSM signature; a full CRL through the fenced transaction (first one
stamps every revocation, second one does not); a delta with 10 new revocations.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomysql
from cryptography.hazmat.primitives.serialization import Encoding

from hapki.cara.crl import build_crl
from hapki.cara.main import CaraRuntime
from hapki.cara.ports import CrlEntry
from hapki.cara.issuance import random_serial, serial_hex
from hapki.cara.store import MariaDBSigningStore
from hapki.lab import stack
from hapki.lab.local import LocalEnv

REASONS = ["key_compromise", "superseded", "cessation_of_operation", "unspecified", "affiliation_changed"]


async def insert_revocations(env: LocalEnv, count: int, now: datetime) -> list[CrlEntry]:
    conn = await aiomysql.connect(host="127.0.0.1", port=env.db.port, user=env.db.user, password=env.db.password(),
                                  db=env.db.database, autocommit=True)
    entries = [CrlEntry(serial=serial_hex(random_serial()), revoked_at=now - timedelta(seconds=i),
                        reason=REASONS[i % len(REASONS)]) for i in range(count)]
    try:
        async with conn.cursor() as cur:
            for start in range(0, count, 5000):
                await cur.executemany(
                    "INSERT INTO revocations (issuer, serial, reason, revoked_at, requester) VALUES"
                    " ('issuing-1', %s, %s, %s, 'bench')",
                    [(e.serial, e.reason, e.revoked_at.replace(tzinfo=None)) for e in entries[start:start + 5000]])
    finally:
        conn.close()
    return entries


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hapki-crl-bench-") as tmp:
        base = Path(tmp)
        env = LocalEnv(base).start()
        try:
            path = stack.write_config(stack.cara_config(env), base / "cara.toml")
            subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(path)], check=True,
                           capture_output=True, timeout=120, env={**os.environ})
            cara = CaraRuntime(stack.cara_config(env))
            await cara.open()  # the signer stays passive: the publisher loop idles, this script drives it
            try:
                now = datetime.now(UTC)
                began = time.perf_counter()
                entries = await insert_revocations(env, count, now)
                print(f"inserted {count} revocations in {time.perf_counter() - began:.2f} s")
                key = cara.hsm.private_key(cara.signer._issuer.key_id)  # noqa: SLF001 (a script)
                began = time.perf_counter()
                crl = build_crl(entries, issuer_cert=cara.signer._issuer_cert, issuer_key=key, number=1, base=None,  # noqa: SLF001
                                this_update=now, next_update=now + timedelta(days=7))
                der = crl.public_bytes(Encoding.DER)
                print(f"build + HSM sign only: {time.perf_counter() - began:.2f} s, {len(der)} bytes DER")
                epoch = await MariaDBSigningStore(cara.db).bump_epoch("bench", datetime.now(UTC))
                for label in ("full CRL, first (stamps every revocation)", "full CRL, again"):
                    began = time.perf_counter()
                    record = await cara.crl.publish(epoch, delta=False)
                    print(f"{label}: {time.perf_counter() - began:.2f} s, number {record.number}, "
                          f"{record.entries} entries, {len(record.der)} bytes")
                await insert_revocations(env, 10, datetime.now(UTC))
                began = time.perf_counter()
                record = await cara.crl.publish(epoch, delta=True)
                print(f"delta CRL with {record.entries} entries: {time.perf_counter() - began:.3f} s")
                began = time.perf_counter()
                latest = await cara.crl._store.latest_crl("issuing-1", delta=False)  # noqa: SLF001
                print(f"read latest full CRL from the database: {time.perf_counter() - began:.3f} s"
                      f" ({len(latest.der)} bytes)")
            finally:
                await cara.stop()
        finally:
            env.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
