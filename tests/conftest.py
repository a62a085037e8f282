"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from telemetry_fixture import memory_exporter


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Spans finished during the test (the process-wide SDK provider, cleared before and after)."""
    exporter = memory_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()
