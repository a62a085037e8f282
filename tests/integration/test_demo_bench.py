"""`hapki demo` and `hapki bench` as a user runs them: subprocesses that start and stop the whole local stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
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


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_recovers_from_a_killed_run_in_the_same_directory(tmp_path: Path) -> None:
    base, log = tmp_path / "demo", tmp_path / "keep.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAPKI_", "OTEL_"))}
    first_run: list[int] = []
    with log.open("w") as out:
        keep = subprocess.Popen([*hapki_command(), "demo", "--dir", str(base), "--keep"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while "keeps running until Ctrl-C" not in log.read_text() and keep.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert keep.poll() is None, log.read_text()
        first_run += [int(p) for p in re.findall(r"(?:CARA|CLM) pid (\d+)", log.read_text())]
        first_run += [int((base / f).read_text()) for f in ("nats/nats-server.pid", "db/mariadbd.pid")]
        assert len(first_run) == 4 and all(_alive(pid) for pid in first_run)
        keep.kill()  # a crash: the demo stops nothing, its children keep running
        keep.wait(10)

        again = _hapki("demo", "--dir", str(base))
        assert again.returncode == 0, again.stdout + again.stderr
        assert "out/cert.pem: OK" in again.stdout
        assert not any(_alive(pid) for pid in first_run)
    finally:
        if keep.poll() is None:
            keep.kill()
            keep.wait(10)
        for pid in first_run:  # only if the test failed half-way: don't leave the crashed run's processes behind
            if _alive(pid) and str(base) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                os.kill(pid, signal.SIGKILL)


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
    per = level["cpu_ms_per_issuance"]  # every service did work for each certificate; the client counts alone
    assert all(per[k] > 0 for k in ("clm", "cara", "mariadbd", "nats-server")), per
    assert per["bench-client"] < per["clm"] + per["cara"] + per["mariadbd"], per


def test_bench_crl_reports_generation_times_as_json() -> None:
    result = _hapki("bench", "--crl", "300", "--json", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    crl = json.loads(result.stdout)["crl"]
    assert crl["entries"] == 300 and crl["der_bytes"] > 300 * 20  # every entry is on the signed CRL
    assert crl["delta_entries"] == 10  # exactly the revocations since the base
    assert 0 < crl["build_and_sign_seconds"] and 0 < crl["full_first_seconds"] and 0 < crl["delta_seconds"]


def test_bench_refuses_bad_revocation_arguments() -> None:
    for args in (["--crl", "0"], ["--ocsp", "x,16"], ["--ocsp", "0"]):
        result = _hapki("bench", *args)
        assert result.returncode == 2 and "hapki bench:" in result.stderr, (args, result.stderr)
