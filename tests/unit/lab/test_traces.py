"""hapki.lab.traces on a hand-written issuance trace: loading, the tree, and the stage split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hapki.lab.traces import (
    issuance_stages,
    load_spans,
    spans_of_request,
    stage_breakdown,
    stage_table,
    trace_tree,
    traces_of_request,
)

T = "a" * 32
MS = 1_000_000
BASE = 1_700_000_000_000_000_000


def span(span_id: str, parent: str | None, name: str, service: str, start_ms: float, end_ms: float,
         trace_id: str = T, status: str = "UNSET", **attributes: object) -> dict:
    return {"trace_id": trace_id, "span_id": span_id, "parent_id": parent, "name": name, "service": service,
            "start_ns": BASE + int(start_ms * MS), "end_ns": BASE + int(end_ms * MS), "status": status,
            "attributes": attributes}


def issuance(trace_id: str = T) -> list[dict]:
    """One issuance as the real services trace it (ms on a common clock), listed out of order on purpose.

    e2e 20 = client 1.5 (20 - CLM root 18.5) + clm 2.5 (18.5 - (18 - 4) - 2) + bus 6 ((6 - 4) + (18 - 14))
    + cara 3 (8 - 1 - 4) + hsm 1 + db 6 (clm 2 + cara 4).
    """
    return [
        span("s08", "s07", "db.commit", "hapki-cara", 6, 7, trace_id, **{"db.txn": "cara.outcome"}),
        span("s01", None, "demo.issue", "hapki-demo", 0, 20, trace_id),
        span("s02", "s01", "client.issue", "hapki-demo", 0, 20, trace_id),
        span("s03", "s02", "pki.v1.clm.issue process", "hapki-clm", 1, 19.5, trace_id),
        span("s04", "s03", "clm.issue", "hapki-clm", 1.5, 18, trace_id, **{"pki.request_id": "r1"}),
        span("s05", "s04", "db.commit", "hapki-clm", 2, 4, trace_id, **{"db.txn": "clm.record"}),
        span("s06", "s04", "bus.publish", "hapki-clm", 4, 5, trace_id),
        span("s07", "s06", "cara.sign", "hapki-cara", 6, 14, trace_id,
             **{"pki.serial": "0abc", "pki.request_id": "r1"}),
        span("s09", "s07", "db.commit", "hapki-cara", 8, 9, trace_id, **{"db.txn": "cara.reserve"}),
        span("s10", "s07", "hsm.sign", "hapki-cara", 10, 11, trace_id, **{"hsm.member": "hsm-a"}),
        span("s11", "s07", "db.commit", "hapki-cara", 11.5, 13.5, trace_id, **{"db.txn": "cara.record_issued"}),
        span("s12", "s07", "pki.v1.cara.issued process", "hapki-clm", 15, 16, trace_id),
    ]


def test_tree_nests_children_by_start_time_with_offsets_and_key_attributes() -> None:
    lines = trace_tree(issuance(), T).splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["demo.issue", "client.issue", "pki.v1.clm.issue", "clm.issue", "db.commit", "bus.publish",
                     "cara.sign", "db.commit", "db.commit", "hsm.sign", "db.commit", "pki.v1.cara.issued"]
    indent = {line.split()[0] + str(i): len(line) - len(line.lstrip()) for i, line in enumerate(lines)}
    assert indent["demo.issue1"] == 0 and indent["client.issue2"] == 2 and indent["cara.sign7"] == 10
    assert indent["hsm.sign10"] == 12
    sign = next(line for line in lines if "cara.sign" in line)
    assert "hapki-cara" in sign and "8.00 ms" in sign and "+6.00 ms" in sign and "pki.serial=0abc" in sign
    assert "hsm.member=hsm-a" in lines[10] and "db.txn=cara.record_issued" in lines[11]


def test_spans_whose_parent_is_missing_become_roots() -> None:
    spans = [s for s in issuance() if s["name"] != "bus.publish"]  # cara.sign loses its parent
    lines = trace_tree(spans, T).splitlines()
    sign = next(line for line in lines if "cara.sign" in line)
    assert not sign.startswith(" ")
    assert lines[1].startswith("demo.issue")  # earlier root first
    assert "+0.00 ms" in lines[1]


def test_tree_marks_errors_and_reports_an_unknown_trace() -> None:
    spans = issuance()
    spans[9]["status"] = "ERROR"
    assert "ERROR" in next(line for line in trace_tree(spans, T).splitlines() if "hsm.sign" in line)
    assert "no spans" in trace_tree(spans, "b" * 32)


def test_stage_times_add_up_to_the_end_to_end_time() -> None:
    stages = issuance_stages(issuance())[T]
    assert stages == pytest.approx({"e2e": 20, "client": 1.5, "clm": 2.5, "bus": 6, "cara": 3, "hsm": 1, "db": 6,
                                    "db_clm": 2, "db_cara": 4})


def test_breakdown_shares_over_complete_traces_only() -> None:
    other = "b" * 32
    incomplete = [s for s in issuance("c" * 32) if s["name"] != "hsm.sign"]
    shares = stage_breakdown([*issuance(), *issuance(other), *incomplete])
    assert shares == pytest.approx({"client": 0.075, "clm": 0.125, "bus": 0.3, "cara": 0.15, "hsm": 0.05,
                                    "db": 0.3, "db_clm": 0.1, "db_cara": 0.2})
    assert sum(shares[k] for k in ("client", "clm", "bus", "cara", "hsm", "db")) == pytest.approx(1)
    assert set(issuance_stages([*issuance(), *incomplete])) == {T}
    assert stage_breakdown(incomplete) == {}


def _slower(trace_id: str, factor: float) -> list[dict]:
    """issuance(trace_id) with every time stretched by `factor` (all stages scale with it)."""
    spans = issuance(trace_id)
    for s in spans:
        s["start_ns"] = BASE + int((s["start_ns"] - BASE) * factor)
        s["end_ns"] = BASE + int((s["end_ns"] - BASE) * factor)
    return spans


def test_stage_table_gives_each_stage_its_percentiles_and_names_the_slowest_traces() -> None:
    ids = [f"{i:032x}" for i in range(1, 101)]
    spans = [s for i, trace_id in enumerate(ids, start=1) for s in _slower(trace_id, i / 10)]  # e2e 2 .. 200 ms
    lines = stage_table(issuance_stages(spans), slowest=2).splitlines()
    assert lines[0].startswith("100 issuance traces")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:11]}
    assert [float(v) for v in rows["e2e"][:5]] == pytest.approx([100, 180, 198, 200, 101], abs=0.1)
    assert [float(v) for v in rows["bus"][:4]] == pytest.approx([30, 54, 59.4, 60], abs=0.1)  # 6 ms x i/10
    assert rows["bus"][5] == "30%" and rows["db"][5] == "30%" and rows["cara"][5] == "15%"
    assert lines[11].startswith("slowest 2")
    assert lines[12].split()[:2] == [ids[-1], "200.0"] and lines[13].split()[:2] == [ids[-2], "198.0"]
    assert lines[12].split()[2] in ("bus", "db")  # the two largest stages (6 ms each in the unscaled trace)


def test_stage_table_without_a_complete_trace_says_so() -> None:
    assert stage_table({}).startswith("no complete issuance trace")


def test_without_a_client_span_the_clm_root_is_end_to_end() -> None:
    spans = [s for s in issuance() if s["name"] not in ("demo.issue", "client.issue")]
    stages = issuance_stages(spans)[T]
    assert stages["e2e"] == pytest.approx(18.5) and stages["client"] == pytest.approx(0)


def test_load_spans_skips_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    lines = [json.dumps(s) for s in issuance()]
    path.write_text("\n".join(lines) + "\n" + lines[0][:40])
    assert load_spans(path) == issuance()
    path.write_text("\n".join(lines[:3]) + "\n{not json\n" + lines[3] + "\n\n")
    assert [s["span_id"] for s in load_spans(path)] == ["s08", "s01", "s02", "s03"]
    assert load_spans(tmp_path / "missing.jsonl") == []


def test_spans_of_a_request_are_every_span_of_its_traces_and_nothing_else(tmp_path: Path) -> None:
    retry, other = "b" * 32, "c" * 32
    another = issuance(other)
    for s in another:
        if "pki.request_id" in s["attributes"]:
            s["attributes"]["pki.request_id"] = "r2"
    spans = [*issuance(), *another, span("r1", None, "clm.issue", "hapki-clm", 30, 31, retry,
                                          **{"pki.request_id": "r1"})]
    path = tmp_path / "spans.jsonl"
    # Written as the exporter writes (compact JSON), across two files, with a half-written last line.
    lines = [json.dumps(s, separators=(",", ":")) for s in spans]
    path.write_text("\n".join(lines[:5]) + "\n")
    second = tmp_path / "more.jsonl"
    second.write_text("\n".join(lines[5:]) + '\n{"trace_id":"' + T + '","pki.request_id":"r1"')
    found = spans_of_request([path, second, tmp_path / "missing.jsonl"], "r1")
    assert {s["trace_id"] for s in found} == {T, retry}
    assert len(found) == len(issuance()) + 1
    assert traces_of_request(found, "r1") == [T, retry]  # oldest first
    assert spans_of_request([path, second], "nope") == []


def test_hapki_trace_stages_reads_the_span_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hapki.cli.main import main

    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in [*issuance(), *issuance("b" * 32)]))
    assert main(["trace", "--stages", "--slowest", "1", "--file", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 issuance traces") and out[-2].startswith("slowest 1")
    assert main(["trace", "--stages", "--file", str(tmp_path / "missing.jsonl")]) == 1  # no complete trace
    assert main(["trace", "--file", str(path)]) == 2  # neither a request id nor --stages
    assert main(["trace", "r1", "--stages", "--file", str(path)]) == 2
