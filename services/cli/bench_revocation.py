"""`hapki bench --ocsp` and `hapki bench --crl N`: revocation figures (issue 5).

OCSP: responses/s and latency through the CARA VIP of the HA lab over TLS (`https://<cara VIP>`, haproxy), with
`concurrency` closed-loop clients for `seconds`, each on one kept-alive connection (hapki.cli.ocsp_load). The mix:
CERTIFICATES certificates issued for the run, asked about by GET (RFC 6960 A.1, cacheable: haproxy answers
from its cache) and one request in POST_EVERY by POST (CARA answers from its memory cache). The table says where
the answers came from. The lab is brought up if it is not (and taken down again afterwards). Every response is
checked: a successful `good` about the serial asked; anything else is counted as an error. The load generator
shares the machine's 2 cores with the whole lab: `machine` is the CPU every process on the host used.

CRL: generation time with N revoked entries on a local single-host stack (real MariaDB and SoftHSM):
build + HSM signature alone; a full CRL through CARA's fenced transaction (the first one stamps every
revocation with its CRL number, a second one does not); a delta CRL with 10 new revocations.
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
from typing import Any

import aiomysql
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hapki.cli import ocsp_load
from hapki.cli.bench import percentile
from hapki.cli.client import ClmClient, new_key_and_csr
from hapki.cli.procstat import ProcessGroups, machine_busy_seconds
from hapki.contracts.models import IssueCertificate

CERTIFICATES = 16  # distinct certificates the OCSP load asks about
POST_EVERY = 10  # one OCSP request in this many is a POST, the rest GETs
REASONS = ("key_compromise", "superseded", "cessation_of_operation", "unspecified", "affiliation_changed")
INSERT_BATCH = 5000


# --- OCSP through the VIP ---------------------------------------------------------------------------------------

async def _ocsp_requests(nats_urls: Any, count: int, *, nonce: bool = False) -> list[tuple[int, bytes]]:
    """Issue `count` certificates through the lab; (serial, DER OCSP request) for each, with a nonce if asked
    (a fixed one per request: CARA signs every nonce request anew, whatever the nonce)."""
    client = await ClmClient.connect(nats_urls, timeout=30.0)
    try:
        replies = await asyncio.gather(*(client.issue(IssueCertificate(
            csr_pem=new_key_and_csr([f"ocsp-bench-{i}.example.com"])[0].decode(), profile="tls-server",
            requester="bench")) for i in range(count)))
    finally:
        await client.close()
    out = []
    for reply in replies:
        if reply.certificate_pem is None or reply.chain_pem is None:
            raise RuntimeError(f"could not issue a benchmark certificate: {reply.error or reply.status}")
        cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
        issuer = x509.load_pem_x509_certificates(reply.chain_pem.encode())[0]
        builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        body = builder.build()
        out.append((cert.serial_number, body.public_bytes(serialization.Encoding.DER)))
    return out


def probes_for(host: str, requests: list[tuple[int, bytes]], post_every: int) -> list[ocsp_load.Probe]:
    """The request mix each client cycles through: GETs (what browsers and RFC 5019 clients send), and one POST in
    `post_every` (what `openssl ocsp` sends; haproxy does not cache POSTs, so these reach CARA's memory cache)."""
    probes = []
    for i in range(post_every):
        for serial, der in requests:
            probe = ocsp_load.post_probe if post_every and i == post_every - 1 else ocsp_load.get_probe
            probes.append(probe(host, der, serial))
    return probes


def _ocsp_level(target: ocsp_load.Target, probes: list[ocsp_load.Probe], concurrency: int, seconds: float,
                warmup: float, rate: float | None = None,
                services: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """One level; with `services` (group -> PIDs) also their CPU ms per answer (warm-up included in both)."""
    groups = ProcessGroups(services or {})
    groups.start()
    machine_before, began = machine_busy_seconds(), time.monotonic()
    raw = ocsp_load.run(target, probes, concurrency, seconds, warmup, rate)
    machine = 100 * (machine_busy_seconds() - machine_before) / (time.monotonic() - began)
    cpu = groups.stop()
    answered = len(raw["latencies_ms"]) * (seconds + warmup) / seconds  # the warm-up's answers, estimated
    ordered = sorted(raw["latencies_ms"])
    return {"concurrency": concurrency, "seconds": seconds, "responses_per_second": round(len(ordered) / seconds, 1),
            "p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99), "errors": raw["errors"],
            "error_samples": raw["error_samples"], "sources": raw["sources"], "methods": raw["methods"],
            "connections": raw["connections"], "warmup_errors": raw["warmup_errors"],
            "load_processes": raw["processes"],
            "machine_cpu_percent": round(machine), "rate": rate,
            "cpu_ms_per_answer": {k: round(1000 * v / answered, 4) if answered else None for k, v in cpu.items()}}


def bench_ocsp(lab_dir: Path, levels: list[int], seconds: float, say: Any, *, certificates: int = CERTIFICATES,
               post_every: int = POST_EVERY, nonce: bool = False, rate: float | None = None) -> dict[str, Any]:
    """OCSP through the lab's CARA VIP over TLS at each concurrency level (lab brought up and down if needed)."""
    from hapki.lab.ha import Lab

    lab = Lab(lab_dir)
    was_up = lab.procs.meta.get("state") == "up" and lab.reachable()
    if not was_up:
        say(f"  bringing the HA lab up in {lab.base_dir} ...")
        lab.up()
    try:
        requests = asyncio.run(_ocsp_requests(lab.client_nats_config(), certificates, nonce=nonce))
        tier = lab.topo.tiers["cara"]
        target = ocsp_load.Target(address=str(tier.vip), port=tier.https_port, server_hostname=str(tier.vip),
                                  cafile=lab.ca_bundle)
        probes = probes_for(str(tier.vip), requests, post_every)
        # CPU per answer of the CARA tier's processes (both members; the VIP holder does the work).
        services = {kind: [pid for m in tier.members for pid in lab.procs.pids(f"{kind}@{m}")]
                    for kind in ("haproxy", "cara")}
        results = []
        for level in levels:
            paced = "" if rate is None else f", paced to {rate:g}/s in all"
            say(f"  OCSP, {level} clients{paced}: 1 s warm-up, then {seconds:g} s measured against {lab.url('cara')}"
                " ...")
            results.append(_ocsp_level(target, probes, level, seconds, warmup=1.0, rate=rate, services=services))
        return {"url": lab.url("cara"), "certificates": certificates, "post_every": post_every, "nonce": nonce,
                "rate": rate, "levels": results}
    finally:
        if was_up:
            lab.detach()
        else:
            lab.down()


# --- CRL generation -----------------------------------------------------------------------------------------------

async def _insert_revocations(env: Any, issuer: str, count: int, now: datetime) -> list[Any]:
    from hapki.cara.issuance import random_serial, serial_hex
    from hapki.cara.ports import CrlEntry

    entries = [CrlEntry(serial=serial_hex(random_serial()), revoked_at=now - timedelta(seconds=i),
                        reason=REASONS[i % len(REASONS)]) for i in range(count)]
    conn = await aiomysql.connect(**env.db.connect_kwargs(), autocommit=True)
    try:
        async with conn.cursor() as cur:
            for start in range(0, count, INSERT_BATCH):
                await cur.executemany(
                    "INSERT INTO revocations (issuer, serial, reason, revoked_at, requester) VALUES (%s, %s, %s, %s,"
                    " 'bench')", [(issuer, e.serial, e.reason, e.revoked_at.replace(tzinfo=None))
                                  for e in entries[start:start + INSERT_BATCH]])
    finally:
        conn.close()
    return entries


async def _crl_figures(env: Any, base: Path, count: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives.serialization import Encoding

    from hapki.cara.crl import build_crl
    from hapki.cara.main import CaraRuntime
    from hapki.cara.store import MariaDBSigningStore
    from hapki.lab import stack

    path = stack.write_config(stack.cara_config(env), base / "cara.toml")
    subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(path)], check=True, capture_output=True,
                   timeout=120, env={**os.environ})
    cara = CaraRuntime(stack.cara_config(env))
    await cara.open()  # the signer stays passive: its publisher loop idles, this benchmark drives it
    out: dict[str, Any] = {"entries": count}
    try:
        issuer = cara.signer.issuer.name
        now = datetime.now(UTC)
        began = time.perf_counter()
        entries = await _insert_revocations(env, issuer, count, now)
        out["insert_seconds"] = round(time.perf_counter() - began, 2)
        began = time.perf_counter()
        crl = build_crl(entries, issuer_cert=cara.signer.issuer.certificate, issuer_key=cara.signer.issuer_key,
                        number=1, base=None,
                        this_update=now, next_update=now + timedelta(days=7))
        out["build_and_sign_seconds"] = round(time.perf_counter() - began, 3)
        out["der_bytes"] = len(crl.public_bytes(Encoding.DER))
        epoch = await MariaDBSigningStore(cara.db).bump_epoch("bench", datetime.now(UTC))
        for key in ("full_first_seconds", "full_again_seconds"):
            began = time.perf_counter()
            record = await cara.crl.publish(epoch, delta=False)
            out[key] = round(time.perf_counter() - began, 3)
            assert record.entries == count, (record.entries, count)
        await _insert_revocations(env, issuer, 10, datetime.now(UTC))
        began = time.perf_counter()
        record = await cara.crl.publish(epoch, delta=True)
        out["delta_seconds"], out["delta_entries"] = round(time.perf_counter() - began, 3), record.entries
    finally:
        await cara.stop()
    return out


def bench_crl(count: int, say: Any) -> dict[str, Any]:
    """CRL generation figures with `count` revocations on a fresh local stack (started and stopped here)."""
    from hapki.lab.local import LocalEnv

    with tempfile.TemporaryDirectory(prefix="hapki-crl-bench-") as tmp:
        say(f"  CRL: local stack, {count} revocations ...")
        env = LocalEnv(Path(tmp)).start()
        try:
            return asyncio.run(_crl_figures(env, Path(tmp), count))
        finally:
            env.stop()


def table(report: dict[str, Any]) -> str:
    lines = []
    if "ocsp" in report:
        o = report["ocsp"]
        paced = "" if o.get("rate") is None else f", paced to {o['rate']:g}/s"
        lines += [f"OCSP through the CARA VIP ({o['url']}), TLS, keep-alive, {o['certificates']} certificates, "
                  f"GET with 1 in {o['post_every']} POST{', every request with a nonce' if o.get('nonce') else ''}"
                  f"{paced};"
                  " every answer checked: successful, good, the serial asked",
                  f"{'clients':>7}  {'responses/s':>11}  {'p50 ms':>7}  {'p99 ms':>7}  {'errors':>6}  {'machine':>7}"
                  f"  {'conns':>5}  answered by (haproxy cache / CARA memory / CARA signed)"]
        for r in o["levels"]:
            src, total = r.get("sources", {}), max(1, sum(r.get("sources", {}).values()))
            by = " / ".join(f"{100 * src.get(k, 0) / total:.1f}%" for k in ("haproxy", "cache"))
            signed = sum(v for k, v in src.items() if k not in ("haproxy", "cache"))
            lines.append(f"{r['concurrency']:>7}  {r['responses_per_second']:>11.1f}  {r['p50_ms'] or 0:>7.1f}  "
                         f"{r['p99_ms'] or 0:>7.1f}  {r['errors']:>6}  {r.get('machine_cpu_percent', 0):>6}%"
                         f"  {r.get('connections', 0):>5}  {by} / {100 * signed / total:.1f}%")
            lines += [f"         error: {e}" for e in r.get("error_samples", [])]
            if r.get("warmup_errors"):
                lines.append(f"         ({r['warmup_errors']} failed during the warm-up, not counted; reconnected)")
            if r.get("cpu_ms_per_answer"):
                lines.append("         CPU ms per answer: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in r["cpu_ms_per_answer"].items() if v is not None))
        lines.append("  (machine: CPU of every process on the host, % of one core, 200% = both; the load generator "
                     "and the whole lab included)")
    if "crl" in report:
        c = report["crl"]
        lines += [""] if lines else []
        lines += [f"CRL generation with {c['entries']} revoked entries (local stack, SoftHSM)",
                  f"  build + HSM signature only:     {c['build_and_sign_seconds']:.2f} s ({c['der_bytes']} bytes)",
                  f"  full CRL, fenced, first:        {c['full_first_seconds']:.2f} s (stamps every entry)",
                  f"  full CRL, fenced, steady state: {c['full_again_seconds']:.2f} s",
                  f"  delta CRL ({c['delta_entries']} entries):          {c['delta_seconds']:.3f} s"]
    return "\n".join(lines)


def run(lab_dir: Path, *, ocsp_levels: list[int] | None, crl_entries: int | None, seconds: float,
        as_json: bool, nonce: bool = False, rate: float | None = None) -> int:
    import json

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else (lambda *a: print(*a, flush=True))
    report: dict[str, Any] = {}
    if ocsp_levels:
        report["ocsp"] = bench_ocsp(lab_dir, ocsp_levels, seconds, say, nonce=nonce, rate=rate)
    if crl_entries:
        report["crl"] = bench_crl(crl_entries, say)
    print(json.dumps(report, indent=2) if as_json else table(report))
    failed = any(r["errors"] or not r["responses_per_second"] for r in report.get("ocsp", {}).get("levels", []))
    return 1 if failed else 0
