"""CPU per issuance of the issuance path's database work, in one process, whatever driver hapki.runtime.db uses.

Runs the stores' calls of one issuance batch as CLM and CARA make them (CLM records the requests, concurrently so
they batch as under load; CARA reads outcomes, reserves the intents fenced, stores the certificates fenced) against a
private MariaDB with TLS (hapki.lab.local.LocalEnv, `hapki ca init`), on uvloop, and prints the process's CPU time
(time.process_time) per issuance. The CSRs and approvals are made before the clock starts. Only public calls of
hapki (Database, the stores), so the same file measures another checkout: run it with that checkout's venv.

  .venv/bin/python scripts/bench_store_cpu.py --batches 300 --batch 8
  /path/to/other/checkout/.venv/bin/python scripts/bench_store_cpu.py --batches 300 --batch 8
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import uvloop

from hapki.cara.ports import Intent, IssuedRecord
from hapki.cara.store import MariaDBSigningStore
from hapki.clm.ports import NewRequest
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts.models import IssueCertificate
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve

PEM = "-----BEGIN CERTIFICATE-----\n" + ("A" * 64 + "\n") * 11 + "-----END CERTIFICATE-----\n"


def _csrs(n: int) -> list[str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())  # one key: the stores never look at it
    out = []
    for i in range(n):
        name = f"bench-{i}.example.com"
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
               .sign(key, hashes.SHA256()))
        out.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return out


async def _measure(env: LocalEnv, batches: int, size: int, warmup: int) -> tuple[float, int]:
    profiles = load_profiles(SHIPPED_PROFILES_PATH)
    total = (batches + warmup) * size
    approved = [approve(IssueCertificate(csr_pem=csr, profile="tls-server", requester="bench"), profiles,
                        uuid.uuid4().hex) for csr in _csrs(total)]
    clm_db, cara_db = Database(stack.clm_config(env).database), Database(stack.cara_config(env).database)
    try:
        clm, cara = MariaDBRequestStore(clm_db), MariaDBSigningStore(cara_db)
        issuer = (await cara.load_issuer(None)).name
        epoch = await cara.bump_epoch("bench", utcnow())
        spent = 0.0
        for b in range(batches + warmup):
            start = time.process_time()
            now = utcnow()
            requests = approved[b * size:(b + 1) * size]
            await asyncio.gather(*(clm.record(NewRequest(
                request_id=r.request_id, requester="bench", idempotency_key=f"k-{r.request_id}", profile="tls-server",
                csr_sha256=hashlib.sha256(r.csr_pem.encode()).hexdigest(), approved=r), now) for r in requests))
            ids = [r.request_id for r in requests]
            intents = [Intent(intent_id=uuid.uuid4().hex, request_id=i, issuer=issuer, serial=uuid.uuid4().hex[:32])
                       for i in ids]
            # What the signer does for a batch with nothing stored yet: one guarded reservation (no outcome read).
            assert await cara.reserve_fresh(intents, epoch=epoch, member="bench", now=now)
            await cara.record_issued_batch([IssuedRecord(
                request_id=t.request_id, issuer=issuer, serial=t.serial, intent_id=t.intent_id, cert_pem=PEM,
                not_before=now, not_after=now + timedelta(days=90)) for t in intents], epoch=epoch, now=now)
            if b >= warmup:
                spent += time.process_time() - start
        return spent, batches * size
    finally:
        await clm_db.close()
        await cara_db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8, help="issuances per batch (CLM records, CARA transactions)")
    parser.add_argument("--warmup", type=int, default=20, help="batches before the clock starts")
    args = parser.parse_args()
    import hapki.runtime.db as db

    driver = "asyncmy" if "asyncmy" in db.__dict__ else "aiomysql"
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        base = Path(tmp)
        env = LocalEnv(base).start()
        try:
            cara_path = stack.write_config(stack.cara_config(env), base / "cara.toml")
            subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(cara_path), "--out", str(base)],
                           check=True, capture_output=True, timeout=120, env={**os.environ})
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                spent, issuances = runner.run(_measure(env, args.batches, args.batch, args.warmup))
        finally:
            env.stop()
    print(f"driver {driver}: {spent / issuances * 1e3:.3f} CPU ms per issuance of database work "
          f"({issuances} issuances in batches of {args.batch}, CLM and CARA store calls, TLS, uvloop)")


if __name__ == "__main__":
    main()
