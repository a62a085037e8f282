"""OpenTelemetry set-up and W3C trace-context propagation over NATS headers; logs that carry trace ids.

Exporters come from the standard OTEL_* environment (OTLP/HTTP traces and metrics when OTEL_EXPORTER_OTLP_ENDPOINT,
or the per-signal OTEL_EXPORTER_OTLP_TRACES_/METRICS_ENDPOINT, is set). Metrics are always readable by Prometheus
(hapki.runtime.metrics: each `hapki serve` process serves /metrics).
HAPKI_TRACE_FILE adds a JSON-lines span file: the local environment's collector, read by `hapki demo`/`bench`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file (several processes may share it)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_to_dict(s), separators=(",", ":")) for s in spans]
        with self._lock, open(self._path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: v for k, v in (span.attributes or {}).items() if isinstance(v, str | int | float | bool)},
    }


def setup(service_name: str) -> None:
    """Install the global tracer provider for this process, unless one is installed already (tests)."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    resource = Resource.create({"service.name": service_name})
    from hapki.runtime.metrics import install_provider  # the Prometheus reader (+ OTLP when configured)

    install_provider(resource)
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if path := os.environ.get("HAPKI_TRACE_FILE"):
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path)))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
    meters = metrics.get_meter_provider()
    if hasattr(meters, "shutdown"):
        meters.shutdown()


def unsampled() -> context.Context:
    """A context whose parent span is valid but not sampled: the default ParentBased sampler drops its children.

    For periodic background work (health polls, cache refreshes): a root span per poll would bury real traces."""
    parent = trace.SpanContext(
        trace_id=random.getrandbits(128) or 1, span_id=random.getrandbits(64) or 1, is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (W3C traceparent)."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context a message carried, for use as a span parent."""
    return propagate.extract(dict(headers or {}))


class TraceIdFilter(logging.Filter):
    """Adds trace_id / span_id of the current span to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else "-"
        return True


# Characters that could forge or hide a log line: C0 and C1 controls and DEL (newline, carriage return, NUL,
# ESC sequences), Unicode line and paragraph separators, and the invisible bidi and format characters (RLO
# and friends) that make a line read differently from what it holds.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s trace_id=%(trace_id)s span_id=%(span_id)s %(message)s"
# Continuation lines of a traceback start with this, so no line of one can pass for a record (records start
# with a timestamp).
TRACEBACK_PREFIX = "  | "


def escape_control(text: str) -> str:
    """`text` with every character in _UNSAFE written as a Python escape (\\n, \\x00, \\u202e): one printable line."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class SafeFormatter(logging.Formatter):
    """One record, one line: the message (and anything user-controlled in it) has its control characters escaped.

    A traceback keeps its lines, each escaped and prefixed with TRACEBACK_PREFIX, so an exception message
    carrying a newline cannot start a forged record either.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return self._indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._indent(super().formatStack(stack_info))

    @staticmethod
    def _indent(text: str) -> str:
        return "\n".join(TRACEBACK_PREFIX + escape_control(line) for line in text.splitlines())


def setup_logging(level: str = "INFO") -> None:
    """Structured one-line logs with the trace id, to stderr; control characters escaped (SafeFormatter)."""
    handler = logging.StreamHandler()
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("HAPKI_LOG_LEVEL", level))
