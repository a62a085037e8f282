"""A service process's telemetry set-up: spans to OTLP/HTTP and to the span file at once, metrics on /metrics.

Runs `telemetry.setup` in a child interpreter (providers are process-global) against a local OTLP receiver.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

CHILD = """
import asyncio, sys, urllib.request
from opentelemetry import trace
from hapki.runtime import metrics, telemetry
from hapki.runtime.http import serve

async def main():
    telemetry.setup("hapki-test")
    runner = await serve(metrics.metrics_app(), "127.0.0.1:0")
    port = runner.addresses[0][1]
    metrics.counter("hapki.ocsp.responses").add(3, {"ocsp.status": "good"})
    with trace.get_tracer("t").start_as_current_span("cara.sign"):
        pass
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    print(text)
    await runner.cleanup()
    telemetry.shutdown()

asyncio.run(main())
"""


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that records the paths of OTLP posts (/v1/traces, /v1/metrics) and answers 200."""
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


def test_spans_go_to_otlp_and_the_file_and_metrics_to_prometheus(otlp_receiver: tuple[str, list[str]],
                                                                  tmp_path: Path) -> None:
    endpoint, paths = otlp_receiver
    span_file = tmp_path / "spans.jsonl"
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "HAPKI_TRACE_FILE": str(span_file)}
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    counted = [line for line in result.stdout.splitlines() if line.startswith("hapki_ocsp_responses_total{")]
    assert len(counted) == 1 and 'ocsp_status="good"' in counted[0] and counted[0].endswith(" 3.0"), counted
    assert "/v1/traces" in paths  # the batch span processor flushed at shutdown
    assert "/v1/metrics" in paths  # the periodic metric reader exported at shutdown
    spans = [json.loads(line) for line in span_file.read_text().splitlines()]
    assert [s["name"] for s in spans] == ["cara.sign"] and spans[0]["service"] == "hapki-test"
