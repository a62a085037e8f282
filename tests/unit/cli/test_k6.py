"""The k6 helpers: the summary the scripts write, the failover gap from k6's JSON output, the CSR pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from hapki.cli import k6


def _summary(**overrides: object) -> dict[str, object]:
    base = {"issued": 300, "errors": 0, "seconds": 3, "rate_per_s": 100.0,
            "latency_ms": {"p50": 4.0, "p95": 9.5, "p99": 12.0, "max": 30.0}}
    return {**base, **overrides}


def test_summary_parses_the_figures() -> None:
    s = k6.K6Summary.parse(_summary())
    assert (s.issued, s.errors, s.rate_per_s, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms) == (300, 0, 100.0, 4.0, 9.5,
                                                                                         12.0, 30.0)


def test_summary_of_a_run_that_issued_nothing_has_no_percentiles() -> None:
    s = k6.K6Summary.parse(_summary(issued=0, rate_per_s=0, errors=7, latency_ms={}))
    assert s.p99_ms is None and s.errors == 7


def test_a_summary_without_counts_is_an_error() -> None:
    with pytest.raises(k6.K6Error, match="issued"):
        k6.K6Summary.parse({"errors": 0, "seconds": 1, "rate_per_s": 0})


def _point(metric: str, when: str, value: float) -> str:
    return json.dumps({"type": "Point", "metric": metric, "data": {"time": when, "value": value, "tags": {}}})


def test_gap_finds_the_longest_stretch_without_an_issuance(tmp_path: Path) -> None:
    lines = [json.dumps({"type": "Metric", "metric": "issued", "data": {}})]
    lines += [_point("issued", f"2026-11-26T10:00:0{s}.{ms:03d}123456Z", 1) for s in (0, 1) for ms in (0, 500)]
    lines += [_point("attempt_errors", "2026-11-26T10:00:02.100000001+00:00", 1),
              _point("attempt_errors", "2026-11-26T10:00:02.900000000+00:00", 1),
              _point("issued", "2026-11-26T10:00:04.250000000Z", 1),
              _point("issue_ms", "2026-11-26T10:00:04.250000000Z", 2750.0),
              _point("issued", "2026-11-26T10:00:04.750000000Z", 1),
              '{"type": "Point", "metric": "issued", "da']  # cut short by a killed k6
    points = tmp_path / "points.json"
    points.write_text("\n".join(lines))
    report = k6.gap(points)
    assert report["issued"] == 6 and report["attempt_errors"] == 2 and report["lost"] == 0
    assert report["gap_seconds"] == pytest.approx(2.75, abs=0.001)  # 01.500 -> 04.250
    assert report["gap_starts_at_second"] == pytest.approx(1.5, abs=0.001)
    assert report["worst_ms"] == 2750.0
    assert [row["issued"] for row in report["timeline"]] == [2, 2, 0, 0, 2]
    assert [row["attempt_errors"] for row in report["timeline"]] == [0, 0, 2, 0, 0]
    assert "longest stretch with nothing issued 2.75 s" in k6.format_gap(report)


def test_gap_of_a_run_that_issued_nothing(tmp_path: Path) -> None:
    points = tmp_path / "points.json"
    points.write_text(_point("issue_errors", "2026-11-26T10:00:00Z", 1))
    report = k6.gap(points)
    assert report["issued"] == 0 and report["gap_seconds"] is None
    assert k6.main("gap", points, 0, as_json=False) == 1


def test_csr_pool_is_a_json_array_of_distinct_p256_csrs(tmp_path: Path) -> None:
    path = k6.write_csr_pool(tmp_path / "pool" / "csrs.json", 3, prefix="t")
    pems = json.loads(path.read_text())
    csrs = [x509.load_pem_x509_csr(p.encode()) for p in pems]
    assert len({c.public_key().public_numbers().x for c in csrs}) == 3
    assert all(c.is_signature_valid and c.public_key().curve.name == "secp256r1" for c in csrs)
    names = [c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
             for c in csrs]
    assert names == [["t-0.example.com"], ["t-1.example.com"], ["t-2.example.com"]]
