"""`hapki lab demo` (what `make demo` runs): the HA lab under load through a crash of the active CA member.

Step 1: bring the lab up (network namespaces, keepalived, haproxy, Galera, NATS cluster, two HSMs, services).
Step 2: issue certificates continuously, alternating NATS and HTTPS on the CLM VIP, each request with an
        idempotency key and retried by the client until it is issued, as a real client would.
Step 3: crash the active CARA member (SIGSTOP then SIGKILL of keepalived, haproxy, the signer and the watcher).
Step 4: print the timeline (VIP moved, epoch bumped, first signature on the other member), the exactly-once
        check from the database, and the trace of one issuance; tear the lab down.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

from hapki.cli.client import new_key_and_csr
from hapki.lab.load import Load, crash_member, database_facts, watch_vip
from hapki.runtime import telemetry


def _ms(t: float | None, t0: float) -> str:
    return "never" if t is None else f"{(t - t0) * 1000:+8.0f} ms"


def run_lab_demo(base_dir: Path, *, seconds: float = 12.0, crash_after: float = 4.0, rate: float = 20.0,
                 keep: bool = False) -> int:
    from hapki.lab.ha import Lab, LabError
    from hapki.lab.traces import load_spans, trace_tree

    lab = Lab(base_dir)
    print("Step 1. bringing the HA lab up (namespaces, keepalived, haproxy, Galera x3, NATS x3, 2 HSMs) ...",
          flush=True)
    began = time.monotonic()
    try:
        lab.up()
    except LabError as exc:
        print(f"lab up failed: {exc}", file=sys.stderr)
        lab.down()
        return 1
    print(f"        up in {time.monotonic() - began:.1f} s; CARA VIP on {lab.vip_holders('cara')}, "
          f"CLM VIP on {lab.vip_holders('clm')}")
    os.environ.setdefault("HAPKI_TRACE_FILE", str(lab.trace_file))
    telemetry.setup("hapki-lab-demo")
    try:
        return asyncio.run(_demo(lab, seconds, crash_after, rate, load_spans, trace_tree))
    finally:
        telemetry.shutdown()
        if keep:
            print(f"lab left running under {lab.base_dir}; `hapki lab down` removes it")
        else:
            print("tearing the lab down ...", flush=True)
            lab.down()


async def _demo(lab: Any, seconds: float, crash_after: float, rate: float, load_spans: Any, trace_tree: Any) -> int:
    csrs = [new_key_and_csr([f"demo-{i}.example.com"])[0].decode() for i in range(32)]
    active = lab.vip_holders("cara")[0]
    other = next(m for m in lab.topo.members_of_tier("cara") if m != active)
    print(f"Step 2. issuing {rate:.0f}/s for {seconds:.0f} s over NATS and HTTPS ({lab.url('clm')}), "
          f"idempotent retries ...", flush=True)
    vip_seen: list[tuple[float, tuple[str, ...]]] = []
    async with Load(lab, csrs, rate) as load:
        watcher = asyncio.create_task(watch_vip(lab, "cara", time.monotonic() + seconds + 30, vip_seen))
        driver = asyncio.create_task(load.run(seconds, give_up_after=30.0))
        await asyncio.sleep(crash_after)
        print(f"Step 3. crashing the active CARA member {active} (keepalived, haproxy, signer, watcher) ...",
              flush=True)
        crash_at = await asyncio.to_thread(crash_member, lab, active)
        await driver
        watcher.cancel()
    reqs = load.requests
    facts = await database_facts(lab, [r.key for r in reqs], active, crash_at)
    # A crashed keepalived leaves the VIP configured on the dead member: what matters is the other one taking it.
    vip_moved = next((t for t, holders in vip_seen if t >= crash_at and other in holders), None)
    first_sig = facts["first_signature"].get(other)
    print("\nStep 4. timeline (t=0: crash of", active + ")")
    print(f"  VIP taken by {other}           {_ms(vip_moved, crash_at)}")
    print(f"  epoch now {facts['epoch'][0]} held by {facts['epoch'][1]}, bumped {_ms(facts['epoch'][2].replace(tzinfo=UTC).timestamp(), crash_at)}")
    print(f"  first signature on {other}    {_ms(first_sig, crash_at)}")
    issued = [r for r in reqs if r.serial]
    unavailable = sorted((r.done_at or 0) - r.sent_at for r in reqs if r.sent_at <= crash_at <= (r.done_at or 0))
    per_key = facts["requests"]
    duplicates = sum(1 for _rid, _status, certs in per_key.values() if certs > 1)
    lost = [r.key for r in reqs if r.key not in per_key or per_key[r.key][1] != "issued"]
    print(f"\n  requests sent {len(reqs)}, issued {len(issued)}, lost {len(lost)}, duplicated {duplicates}; "
          f"intents {facts['intents']}")
    if unavailable:
        print(f"  requests in flight at the crash waited up to {max(unavailable) * 1000:.0f} ms")
    ok = not lost and duplicates == 0 and len(issued) == len(reqs)
    print("  every request completed exactly once" if ok else "  NOT every request completed exactly once")
    sample = next((r for r in issued if r.sent_at > crash_at), issued[-1] if issued else None)
    if sample is not None:
        for _ in range(50):  # the services flush spans in batches
            spans = load_spans(lab.trace_file)
            if any(s["trace_id"] == sample.trace_id and s["name"] == "hsm.sign" for s in spans):
                break
            await asyncio.sleep(0.1)
        print(f"\n  trace of one issuance after the failover ({sample.via}, serial {sample.serial}):")
        print(trace_tree(spans, sample.trace_id))
    print(json.dumps({"sent": len(reqs), "issued": len(issued), "lost": len(lost), "duplicated": duplicates}))
    return 0 if ok else 1
