"""nats-server CPU per signing request on the HA lab's R3 cluster: what batching the bus would buy (issue 7).

The question: would one JetStream message per batch of signing requests (a contract change) cost the three NATS
servers much less than what CLM does now, one message per request, published together for a recording batch? And
would a LIMITS stream (max_age) instead of the WORK_QUEUE one (a delete replicated per ack) be cheaper?

On the lab's NATS cluster (it must be up: `hapki lab up`), as the admin user over TLS, each case creates a file
stream of 3 replicas (`BENCH_JS_<pid>`, deleted after), publishes `--rate` requests/s of 1,500 bytes (about a
signing request) for `--seconds`, paced, and a pull consumer on another server takes them in fetches of up to 64
and acks each message. Cases (`--cases`, comma-separated `<retention>:<requests per message>x<burst>`):

  wq:1x1    WORK_QUEUE, one message per request, each published on its own (awaiting its PubAck)
  wq:1x4    WORK_QUEUE, one message per request, 4 published at once (as CLM does for a recording batch of 4)
  wq:4x1    WORK_QUEUE, one message holding 4 requests
  limits:1x4  LIMITS (max_age 60 s), 4 per burst
  limits:1x1:r1  LIMITS, each published alone, a consumer of one replica (no Raft round for its acks)

Prints the servers' CPU (utime + stime of every nats-server of the lab, /proc) per request, and per message.

  .venv/bin/python scripts/bench_jetstream.py --rate 300 --seconds 10 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from hapki.lab.ha import DEFAULT_DIR, Lab

REQUEST_BYTES = 1500
SUBJECT = "bench.jetstream"


@dataclass(frozen=True)
class Case:
    retention: RetentionPolicy
    per_message: int
    burst: int
    consumer_replicas: int = 3  # ":r1": a consumer of one replica (refused on a WORK_QUEUE stream: err 10134)

    @classmethod
    def parse(cls, text: str) -> Case:
        retention, _, rest = text.partition(":")
        shape, _, consumer = rest.partition(":")
        per_message, _, burst = shape.partition("x")
        kinds = {"wq": RetentionPolicy.WORK_QUEUE, "limits": RetentionPolicy.LIMITS}
        replicas = int(consumer.removeprefix("r")) if consumer else 3
        return cls(kinds[retention], int(per_message), int(burst or 1), replicas)

    def __str__(self) -> str:
        kind = "wq" if self.retention == RetentionPolicy.WORK_QUEUE else "limits"
        return f"{kind}:{self.per_message}x{self.burst}" + (f":r{self.consumer_replicas}"
                                                             if self.consumer_replicas != 3 else "")


def nats_cpu_ticks(lab_dir: Path) -> int:
    """utime + stime (clock ticks) of every nats-server whose command line names the lab's directory."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"nats-server" not in cmdline or str(lab_dir).encode() not in cmdline:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])
    return total


async def run_case(lab: Lab, case: Case, rate: float, seconds: float) -> dict[str, object]:
    kwargs = lab.nats_connect_kwargs()
    servers = kwargs.pop("servers")
    producer = await nats.connect(servers=servers[:1], **kwargs)
    consumer = await nats.connect(servers=servers[1:2], **kwargs)  # another server, as CLM and CARA usually are
    js, js_consumer = producer.jetstream(), consumer.jetstream()
    stream = f"BENCH_JS_{os.getpid()}"
    await js.add_stream(StreamConfig(
        name=stream, subjects=[f"{SUBJECT}.{os.getpid()}"], retention=case.retention, storage=StorageType.FILE,
        num_replicas=3, max_age=60.0 if case.retention == RetentionPolicy.LIMITS else None))
    try:
        await js.add_consumer(stream, ConsumerConfig(durable_name="bench", ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
                                                     max_ack_pending=4096, num_replicas=case.consumer_replicas))
        psub = await js_consumer.pull_subscribe_bind(durable="bench", stream=stream)
        requests = int(rate * seconds)
        messages = requests // case.per_message
        payload = os.urandom(REQUEST_BYTES // 2).hex().encode() * case.per_message
        taken = 0

        async def consume() -> None:
            nonlocal taken
            while taken < messages:
                try:
                    msgs = await psub.fetch(64, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                taken += len(msgs)

        consuming = asyncio.create_task(consume())
        before, start = nats_cpu_ticks(lab.base_dir), time.monotonic()
        for sent in range(0, messages, case.burst):
            delay = start + sent * case.per_message / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            burst = min(case.burst, messages - sent)
            await asyncio.gather(*(js.publish(f"{SUBJECT}.{os.getpid()}", payload) for _ in range(burst)))
        await asyncio.wait_for(consuming, timeout=60)
        elapsed, ticks = time.monotonic() - start, nats_cpu_ticks(lab.base_dir) - before
        hz = os.sysconf("SC_CLK_TCK")
        return {"case": str(case), "requests": requests, "messages": messages, "seconds": round(elapsed, 1),
                "nats_ms_per_request": round(ticks / hz * 1000 / requests, 3),
                "nats_ms_per_message": round(ticks / hz * 1000 / messages, 3)}
    finally:
        await js.delete_stream(stream)
        await producer.close()
        await consumer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lab-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--rate", type=float, default=300.0, help="signing requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="each case this often, alternating; the median is shown")
    parser.add_argument("--cases", default="wq:1x1,wq:1x4,wq:4x1,limits:1x4,wq:1x12,wq:12x1")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lab = Lab(args.lab_dir)
    cases = [Case.parse(text) for text in args.cases.split(",")]
    results: dict[str, list[dict[str, object]]] = {str(case): [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            results[str(case)].append(await run_case(lab, case, args.rate, args.seconds))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'case':12s} {'requests':>8s} {'messages':>8s} {'NATS ms/request':>16s} {'NATS ms/message':>16s}")
    for case, runs in results.items():
        per_request = statistics.median(float(r["nats_ms_per_request"]) for r in runs)  # type: ignore[arg-type]
        per_message = statistics.median(float(r["nats_ms_per_message"]) for r in runs)  # type: ignore[arg-type]
        print(f"{case:12s} {runs[0]['requests']:>8} {runs[0]['messages']:>8} {per_request:16.3f} {per_message:16.3f}")


if __name__ == "__main__":
    asyncio.run(main())
