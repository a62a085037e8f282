"""The JSON-lines span file rotates by size and readers see the rotated files (HAPKI_TRACE_FILE_MAX_MB/_BACKUPS).

A lab or a soak that traces every request wrote ~4 KB per issuance into one file without bound; now the file
becomes `<file>.1` at the limit and the oldest rotated file goes. Several processes share one file: their writes
must neither interleave nor each rotate the same file (the flock).
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from hapki.lab.traces import load_spans, spans_of_request
from hapki.runtime.telemetry import JsonLinesSpanExporter, SpanFileLimits, remove_span_files, span_files


def write_spans(path: Path, limits: SpanFileLimits, count: int, service: str = "svc") -> None:
    """`count` spans named 0..count-1 through the exporter, one export each (as a busy BatchSpanProcessor does)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path), limits)))
    tracer = provider.get_tracer("test")
    for number in range(count):
        with tracer.start_as_current_span(str(number)) as span:
            span.set_attribute("pki.request_id", f"{service}-{number}")
    provider.shutdown()


def test_the_file_rotates_at_its_limit_and_keeps_the_newest_backups(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    limits = SpanFileLimits(max_bytes=2_000, backups=2)
    write_spans(path, limits, 60)
    files = span_files(path)
    assert [f.name for f in files] == ["traces.jsonl.2", "traces.jsonl.1", "traces.jsonl"]
    assert not (tmp_path / "traces.jsonl.3").exists()
    assert all(f.stat().st_size <= limits.max_bytes for f in files)
    names = [int(span["name"]) for span in load_spans(path)]
    # The newest spans, in order, ending with the last written; the oldest went with the dropped files.
    assert names == list(range(names[0], 60))
    assert 0 < names[0]


def test_no_backups_starts_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    write_spans(path, SpanFileLimits(max_bytes=1_500, backups=0), 40)
    assert span_files(path) == [path]
    assert path.stat().st_size <= 1_500
    assert int(load_spans(path)[-1]["name"]) == 39


def test_readers_find_a_request_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    write_spans(path, SpanFileLimits(max_bytes=2_000, backups=50), 60)
    assert len(span_files(path)) > 2
    first = spans_of_request([path], "svc-0")  # written first: in the oldest rotated file
    assert [span["name"] for span in first] == ["0"]
    assert len(load_spans(path)) == 60
    remove_span_files(path)
    assert span_files(path) == []


def test_processes_sharing_the_file_neither_interleave_nor_lose_spans(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    limits = SpanFileLimits(max_bytes=8_000, backups=1_000)  # enough backups to keep every span
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_spans, args=(path, limits, 150, f"p{n}")) for n in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    lines = [line for f in span_files(path) for line in f.read_bytes().splitlines()]
    spans = [json.loads(line) for line in lines]  # a torn or interleaved line would not parse
    assert sorted((s["service"], int(s["name"])) for s in spans) == sorted(
        (f"p{n}", i) for n in range(4) for i in range(150))
    assert all(f.stat().st_size <= limits.max_bytes for f in span_files(path))


@pytest.mark.parametrize(("env", "named"), [
    ({"HAPKI_TRACE_FILE_MAX_MB": "0"}, "HAPKI_TRACE_FILE_MAX_MB"),
    ({"HAPKI_TRACE_FILE_MAX_MB": "lots"}, "HAPKI_TRACE_FILE_MAX_MB"),
    ({"HAPKI_TRACE_FILE_MAX_MB": "nan"}, "HAPKI_TRACE_FILE_MAX_MB"),
    ({"HAPKI_TRACE_FILE_BACKUPS": "-1"}, "HAPKI_TRACE_FILE_BACKUPS"),
    ({"HAPKI_TRACE_FILE_BACKUPS": "2.5"}, "HAPKI_TRACE_FILE_BACKUPS"),
])
def test_a_bad_limit_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SpanFileLimits.from_env(env)


def test_limits_from_the_environment() -> None:
    assert SpanFileLimits.from_env({}) == SpanFileLimits()
    assert SpanFileLimits.from_env({"HAPKI_TRACE_FILE_MAX_MB": "0.5", "HAPKI_TRACE_FILE_BACKUPS": "0"}) == \
        SpanFileLimits(max_bytes=512 * 1024, backups=0)


def test_a_write_that_fails_drops_the_batch_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "gone" / "traces.jsonl"  # its directory does not exist: open fails
    write_spans(missing, SpanFileLimits(), 1)
    assert "could not write 1 spans" in caplog.text
