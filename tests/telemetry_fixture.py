"""In-memory span capture for tests: `memory_exporter()` installs it once per process and returns the exporter.

The global OpenTelemetry tracer provider can be set only once per process. If another SDK provider is already
installed, the exporter is attached to it instead, so every test sees the same spans either way.
"""

from __future__ import annotations

import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_lock = threading.Lock()
_exporter: InMemorySpanExporter | None = None


def memory_exporter() -> InMemorySpanExporter:
    """The process's in-memory span exporter (finished spans, synchronously exported). Call `.clear()` per test."""
    global _exporter
    with _lock:
        if _exporter is None:
            exporter = InMemorySpanExporter()
            provider = trace.get_tracer_provider()
            if not isinstance(provider, TracerProvider):
                trace.set_tracer_provider(TracerProvider())
                provider = trace.get_tracer_provider()
            if not isinstance(provider, TracerProvider):
                raise RuntimeError(f"a non-SDK tracer provider is installed: {type(provider).__name__}")
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            _exporter = exporter
        return _exporter
