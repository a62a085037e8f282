"""CLM's memory, CPU and /metrics size while clients issue over NATS or HTTPS on the running HA lab.

    sudo .venv/bin/python scripts/bench_clm_clients.py --via nats --requests 6000 [--rate 100] [--concurrency 64]
    sudo .venv/bin/python scripts/bench_clm_clients.py --via mixed --requests 30000 --every 5000  # a soak

The benchmarks drive HTTPS through the CLM VIP; NATS clients reach both CLM members (one queue group), so a cost
that only the bus path has never showed there (docs/PERFORMANCE.md, "NATS clients": a metric series per reply).
This issues `--requests` certificates at `--rate` with up to `--concurrency` in flight, each request retried with
its idempotency key until issued, and reports for each CLM member's serving process (the child of its
`--supervise` process): resident memory every `--every` requests, CPU ms per issuance over the run, and the lines
of its /metrics at the end; the resident memory of every other service process (CARA, the watchers) too.
`--via mixed` alternates NATS and HTTPS as the fault suite does. Run it on a freshly started lab (or right after a
CLM restart) to see growth.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from hapki.cli.client import new_key_and_csr
from hapki.cli.procstat import cpu_seconds, rss_mib, with_descendants
from hapki.contracts.models import IssueCertificate, RequestStatus
from hapki.lab import prometheus
from hapki.lab.ha import DEFAULT_DIR, Lab
from hapki.lab.load import Load

ATTEMPTS = 5
ATTEMPT_TIMEOUT_SECONDS = 4.0


def serving_child(supervisor: int, descendants: Sequence[int]) -> int | None:
    """The process that serves: the one descendant of the supervisor (None while it is being forked again)."""
    others = [pid for pid in descendants if pid != supervisor]
    return others[0] if len(others) == 1 else None


def _mib(pid: int) -> str:
    """Resident memory of `pid` now, whole MiB ("gone" if it ended)."""
    rss = rss_mib(pid)
    return "gone" if rss is None else f"{rss:.0f}"


def metrics_lines(target: str) -> int:
    """Lines of http://<target>/metrics."""
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
        return len(response.read().splitlines())


def per_issuance_ms(cpu_before: float | None, cpu_after: float | None, issued: int) -> float | None:
    """CPU ms per issuance of a process over the run; None if it was not there for all of it or nothing issued."""
    if cpu_before is None or cpu_after is None or issued <= 0:
        return None
    return round((cpu_after - cpu_before) * 1000 / issued, 3)


def via_of(via: str, i: int) -> str:
    """The path of request `i`: `via`, or NATS and HTTPS in turn for `mixed`."""
    return ("nats", "https")[i % 2] if via == "mixed" else via


async def drive(lab: Lab, via: str, requests: int, rate: float, concurrency: int, every: int,
                watched: dict[str, int]) -> int:
    csrs = [new_key_and_csr([f"clients-{i}.example.com"])[0].decode() for i in range(8)]
    issued = 0
    async with Load(lab, csrs, rate) as load:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            nonlocal issued
            body = IssueCertificate(csr_pem=csrs[i % len(csrs)], profile="tls-server", requester="bench-clients",
                                    idempotency_key=f"clients-{uuid.uuid4().hex}")
            async with gate:
                for _ in range(ATTEMPTS):
                    try:
                        reply = await load.issue_once(via_of(via, i), body, ATTEMPT_TIMEOUT_SECONDS)
                    except (OSError, TimeoutError, ValueError) as exc:  # aiohttp's and nats-py's errors included
                        print(f"request {i}: {type(exc).__name__}; again")
                        continue
                    if reply.status is RequestStatus.ISSUED:
                        issued += 1
                        return
                    await asyncio.sleep(0.1)

        began, tasks = time.monotonic(), []
        for i in range(requests):
            await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
            if (i + 1) % every == 0:
                print(f"{i + 1:>6} sent, MiB: " + ", ".join(f"{m} {_mib(pid)}" for m, pid in watched.items()),
                      flush=True)
        await asyncio.gather(*tasks)
    return issued


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--via", choices=("nats", "https", "mixed"), default="nats")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--every", type=int, default=1000, help="print resident memory every N requests sent")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    lab = Lab(args.dir)
    lab.procs.load()
    children: dict[str, int] = {}  # clm member -> its serving process
    others: dict[str, int] = {}  # every other supervised service (cara@..., watcher@...) -> its serving process
    for name in lab.procs.names():
        kind, _, member = name.partition("@")
        if kind not in ("clm", "cara", "watcher"):
            continue
        supervisor = lab.procs.pid(name)
        child = serving_child(supervisor, with_descendants([supervisor])) if supervisor else None
        if child is None:
            raise SystemExit(f"{name}: no serving process (is the lab up?)")
        if kind == "clm":
            children[member] = child
        else:
            others[name] = child
    before = {m: (_mib(pid), cpu_seconds(pid)) for m, pid in children.items()}
    print("start: " + ", ".join(f"{m} {_mib(pid)} MiB" for m, pid in children.items()), flush=True)
    others_before = {name: _mib(pid) for name, pid in others.items()}
    issued = asyncio.run(drive(lab, args.via, args.requests, args.rate, args.concurrency, args.every,
                               {**children, **others}))
    targets = {member: target for target, member, _ in prometheus.targets(lab.topo)["clm"]}
    print(f"issued {issued} of {args.requests} over {args.via}")
    for member, pid in children.items():
        print(f"{member} (pid {pid}): RSS {before[member][0]} -> {_mib(pid)} MiB, "
              f"CPU {per_issuance_ms(before[member][1], cpu_seconds(pid), issued)} ms per issuance, "
              f"/metrics {metrics_lines(targets[member])} lines")
    print("others: " + ", ".join(f"{name} {others_before[name]} -> {_mib(pid)} MiB" for name, pid in others.items()))


if __name__ == "__main__":
    main()
