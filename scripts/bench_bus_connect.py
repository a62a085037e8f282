"""What a bus password's bcrypt cost adds to every NATS connection: the client's wait and the server's CPU.

Starts a private nats-server (the wheel's, on a free loopback port, plain TCP) whose one user has a password hashed
by `bus_auth.hash_password` at each `--costs` value in turn, connects `--connections` times with nats-py, and prints
the median connect time and the server's CPU per connection (from /proc). The project's cost is BCRYPT_COST.

  .venv/bin/python scripts/bench_bus_connect.py [--costs 10,4] [--connections 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import nats

from hapki.lab.local import _nats_binary, free_port
from hapki.runtime.bus_auth import BCRYPT_COST, hash_password


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _connect_times(url: str, password: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client = await nats.connect(url, user="bench", password=password, allow_reconnect=False)
        times.append(time.perf_counter() - start)
        await client.close()
    return times


def _run(cost: int, count: int) -> tuple[float, float]:
    """(median connect ms, server CPU ms per connection) at ``cost``."""
    password = secrets.token_urlsafe(24)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hapki-bus-connect-") as tmp:
        conf = Path(tmp) / "nats.conf"
        user = f'{{ user: "bench", password: "{hash_password(password, cost)}" }}'
        conf.write_text(f'listen: "127.0.0.1:{port}"\nauthorization {{ users = [ {user} ] }}\n')
        server = subprocess.Popen([_nats_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:  # until it listens
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("nats-server did not start") from None
                    time.sleep(0.05)
            before = _cpu_seconds(server.pid)
            times = asyncio.run(_connect_times(f"nats://127.0.0.1:{port}", password, count))
            cpu = _cpu_seconds(server.pid) - before
        finally:
            server.terminate()
            server.wait(timeout=10)
    return statistics.median(times) * 1000, cpu / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", default=f"10,{BCRYPT_COST}")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    costs = [int(c) for c in args.costs.split(",")]
    results: dict[int, list[tuple[float, float]]] = {c: [] for c in costs}
    for _ in range(args.rounds):
        for cost in costs:
            results[cost].append(_run(cost, args.connections))
    for cost in costs:
        wait = statistics.median(r[0] for r in results[cost])
        cpu = statistics.median(r[1] for r in results[cost])
        mark = " (BCRYPT_COST)" if cost == BCRYPT_COST else ""
        print(f"cost {cost:2d}{mark}: connect {wait:6.1f} ms (median), nats-server CPU {cpu:6.1f} ms per connection")


if __name__ == "__main__":
    main()
