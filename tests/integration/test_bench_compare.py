"""`hapki bench --compare` and `--growth` as a user runs them, tiny: every column issues, with zero errors,
certificates read back from its own store that verify under its CA; the hot path uses indexes with 20,000
certificates in the database."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hapki.cli import bench_compare
from hapki.lab.stack import hapki_command

pytestmark = pytest.mark.integration


def _hapki(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAPKI_", "OTEL_"))}
    return subprocess.run([*hapki_command(), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(shutil.which("cfssl") is None, reason="golang-cfssl is not installed (scripts/setup.sh)")
def test_compare_runs_every_column_and_each_issues_verifiable_certificates(tmp_path: Path) -> None:
    # What an earlier run of (c) left: its state, and a process of it that was never stopped. (c) starts fresh.
    single = tmp_path / "single"
    single.mkdir()
    (single / "left-by-an-earlier-run").write_text("")
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(single / "db" / "my.cnf")])
    try:
        result = _hapki("bench", "--compare", "--dir", str(tmp_path), "--seconds", "2", "--rate", "20", "--vus", "4",
                        "--warmup", "1", "--json", timeout=240)
        assert leftover.wait(timeout=5) == -signal.SIGKILL
    finally:
        leftover.kill()
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (single / "left-by-an-earlier-run").exists()
    report = json.loads(result.stdout)
    columns = report["columns"]
    assert set(columns) == {"raw", "cfssl", "single", "lab"}
    assert "--with-lab" in columns["lab"]["skipped"]  # never silently: the reason is in the report
    for name in ("raw", "cfssl", "single"):
        column = columns[name]
        assert "runs" in column, (name, column)
        for mode, run in column["runs"].items():
            assert run["errors"] == 0 and run["issued"] > 0, (name, mode, run)
            assert run["p99_ms"] >= run["p50_ms"] > 0, (name, mode, run)
        assert column["verified"]["checked"] > 0 and column["verified"]["failed"] == 0, (name, column["verified"])
    for name in ("cfssl", "single"):
        total = sum(r["issued"] for r in columns[name]["runs"].values())
        assert columns[name]["verified"]["stored"] >= total  # what k6 was told is in the store (warm-up too)
        assert columns[name]["runs"]["rate"]["rate_per_s"] == pytest.approx(20, rel=0.25)
        cpu = columns[name]["runs"]["max"]["cpu_ms_per_issuance"]
        assert all(v is not None and v >= 0 for v in cpu.values()) and cpu["mariadbd"] > 0
        assert all(v and v > 1 for v in columns[name]["rss_peak_mib"].values()), columns[name]["rss_peak_mib"]
    assert set(columns["single"]["runs"]["max"]["cpu_ms_per_issuance"]) == {"clm", "cara", "nats-server", "mariadbd",
                                                                            "k6"}
    assert report["ratios"]["single/cfssl"] > 0 and report["ratios"]["lab/cfssl"] is None
    # The table the command prints without --json, from this very report (every column's runs as recorded).
    text = bench_compare.table(report)
    assert text.count("cpu at 20/s:") == 2 and "(a) raw limit            max" in text, text


def test_growth_hot_path_statements_use_indexes(tmp_path: Path) -> None:
    result = _hapki("bench", "--growth", "20000", "--seconds", "1", "--dir", str(tmp_path), "--json", timeout=240)
    report = json.loads(result.stdout)
    assert report["preload"]["rows"]["certificates"] >= 20000
    assert report["preload"]["rows"]["request_names"] >= 40000
    explained = {item["statement"]: item for item in report["explain"]}
    assert not [s for s, item in explained.items() if item["scans"] or "error" in item], explained
    # The capture saw the hot paths: CARA's store, the OCSP lookup. (CLM's issue path is one INSERT since the
    # batched signer merged; it reads by idempotency key only after a duplicate key, so there is nothing to EXPLAIN.)
    text = "\n".join(explained)
    assert "UPDATE signing_intents" in text and "LEFT JOIN revocations" in text, text
    for phase in ("empty", "loaded"):
        assert report[phase]["issuance"]["errors"] == 0 and report[phase]["issuance"]["rate_per_s"] > 0
        for what in ("ocsp", "ocsp_nonce"):  # from the cache; about random certificates, read and signed each time
            assert report[phase][what]["errors"] == 0 and report[phase][what]["rate_per_s"] > 0, report[phase]
    assert result.returncode == 0, result.stderr[-3000:]
