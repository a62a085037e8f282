"""`hapki demo` and `hapki bench` as a user runs them: subprocesses that start and stop the whole local stack."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hapki.lab.stack import hapki_command
from hapki.lab.traces import STAGES

pytestmark = pytest.mark.integration


def _hapki(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAPKI_", "OTEL_"))}
    return subprocess.run([*hapki_command(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _trace_tree(output: str) -> list[str]:
    """The tree lines printed under step 5: after the column header, up to the blank or summary line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("span ") and "service" in line) + 1
    tree = []
    for line in lines[start:]:
        if not line.strip() or (line.startswith("  ") and " spans from " in line):
            break
        tree.append(line)
    return tree


def test_demo_issues_verifies_and_shows_one_trace(tmp_path: Path) -> None:
    result = _hapki("demo", "--dir", str(tmp_path / "demo"))
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert "-----BEGIN CERTIFICATE-----" in output and "CN=demo.example.com" in output
    assert "out/cert.pem: OK" in output  # openssl verify -x509_strict
    tree = _trace_tree(output)
    roots = [line for line in tree if not line.startswith(" ")]
    assert [r.split()[0] for r in roots] == ["demo.issue"], tree  # one tree, rooted at the demo's span
    names = [line.split()[0] for line in tree]
    for name in ("clm.issue", "cara.sign", "hsm.sign", "db.commit"):
        assert name in names, tree
    assert (tmp_path / "demo" / "out" / "key.pem").stat().st_mode & 0o077 == 0


def test_bench_reports_rate_latency_and_stages_as_json(tmp_path: Path) -> None:
    result = _hapki("bench", "--dir", str(tmp_path / "bench"), "--concurrency", "4", "--seconds", "2", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["cores"] >= 1
    (level,) = report["levels"]
    assert level["concurrency"] == 4
    assert level["rate_per_s"] > 0 and level["errors"] == 0
    assert level["latency_ms"]["p50"] <= level["latency_ms"]["p99"] <= level["latency_ms"]["max"]
    assert level["traces_analysed"] > 0
    assert set(STAGES) <= set(level["stages"])
    assert sum(level["stages"][k] for k in STAGES) == pytest.approx(1, abs=0.01)
    assert {"clm", "cara", "mariadbd", "nats-server"} <= {k for k, v in report["rss_peak_mib"].items() if v}
