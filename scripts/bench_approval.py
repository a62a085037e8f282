"""CPU per issuance of CLM's approval signature and CARA's check of it, for each approval algorithm, in one process.

Approves N distinct P-256 CSRs with the shipped profiles (before the clock starts), then times, with the process's
CPU clock, `ApprovalKey.sign` (CLM, once per request) and `ApprovalVerifier.verify` (CARA, once per request) for a
P-256 and an Ed25519 approval key, alternating the two `--rounds` times; prints the median per request.

  .venv/bin/python scripts/bench_approval.py [--requests 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hapki.contracts.models import IssueCertificate, SignCertificate
from hapki.runtime.approval import ALGORITHMS, ApprovalKey, ApprovalVerifier
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.csr import make_csr, make_key  # noqa: E402  (the tests' CSR maker)


def _cpu_us(work: Callable[[], object], count: int) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    profiles = load_profiles(SHIPPED_PROFILES_PATH)
    requests: list[SignCertificate] = []
    for i in range(args.requests):
        names = [f"host{i}.example.com", f"api{i}.example.com", "192.0.2.10"]
        csr_pem, _ = make_csr(names, key=make_key("p256"), cn=names[0])
        requests.append(approve(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="bench"),
                                profiles, f"{i:032x}"))
    keys = {algorithm: ApprovalKey.generate(algorithm) for algorithm in ALGORITHMS}
    figures: dict[str, dict[str, list[float]]] = {a: {"sign": [], "verify": []} for a in ALGORITHMS}
    for _ in range(args.rounds):
        for algorithm, key in keys.items():
            verifier = ApprovalVerifier([key.public_key()])
            signed: list[SignCertificate] = []
            figures[algorithm]["sign"].append(_cpu_us(lambda: signed.extend(map(key.sign, requests)), len(requests)))
            figures[algorithm]["verify"].append(_cpu_us(lambda: list(map(verifier.verify, signed)), len(requests)))
    print(f"CPU us per request, median of {args.rounds} rounds of {args.requests} requests "
          "(sign: CLM's ApprovalKey.sign; verify: CARA's ApprovalVerifier.verify; both include the canonical payload)")
    for algorithm, by_step in figures.items():
        sign, verify = (statistics.median(by_step[step]) for step in ("sign", "verify"))
        print(f"  {algorithm:8} sign {sign:6.1f}  verify {verify:6.1f}  together {sign + verify:6.1f}")


if __name__ == "__main__":
    main()
