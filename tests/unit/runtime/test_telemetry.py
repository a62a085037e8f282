"""Logs carry the current trace id; trace context survives a trip through NATS-style headers."""

from __future__ import annotations

import logging

from opentelemetry import trace

from hapki.runtime import telemetry
from telemetry_fixture import memory_exporter


def test_log_records_carry_the_current_trace_id() -> None:
    memory_exporter()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    with trace.get_tracer("t").start_as_current_span("outer") as span:
        telemetry.TraceIdFilter().filter(record)
    assert record.trace_id == format(span.get_span_context().trace_id, "032x")
    outside = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    telemetry.TraceIdFilter().filter(outside)
    assert outside.trace_id == "-"


def test_trace_context_round_trips_through_headers() -> None:
    memory_exporter()
    tracer = trace.get_tracer("t")
    with tracer.start_as_current_span("producer") as producer:
        headers = telemetry.inject({"Nats-Msg-Id": "x"})
    assert headers["Nats-Msg-Id"] == "x" and "traceparent" in headers
    with tracer.start_as_current_span("consumer", context=telemetry.extract(headers)) as consumer:
        pass
    assert consumer.get_span_context().trace_id == producer.get_span_context().trace_id
    assert consumer.parent.span_id == producer.get_span_context().span_id
