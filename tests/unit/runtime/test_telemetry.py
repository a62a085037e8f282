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


# --- log lines cannot be forged -------------------------------------------------------------------------------

def _format(message: str, *args: object, exc_info: object = None) -> str:
    record = logging.LogRecord("hapki.test", logging.WARNING, __file__, 1, message, args, exc_info)
    telemetry.TraceIdFilter().filter(record)
    return telemetry.SafeFormatter(telemetry.LOG_FORMAT).format(record)


def test_control_characters_in_a_message_are_escaped_onto_one_line() -> None:
    forged = "x\n2026-11-26 06:00:00,000 INFO hapki.clm trace_id=- span_id=- certificate issued\r\x00\x1b[2K"
    line = _format("refused requester %s", forged)
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\x1b" not in line
    assert line.endswith("refused requester x\\n2026-11-26 06:00:00,000 INFO hapki.clm trace_id=- span_id=- "
                         "certificate issued\\r\\x00\\x1b[2K")


def test_bidi_overrides_and_unicode_line_breaks_are_escaped_but_letters_are_kept() -> None:
    line = _format("name %s", "\u202eevil\u2066\u2028\u0085 müller 名前")
    assert line.endswith("name \\u202eevil\\u2066\\u2028\\x85 müller 名前")


def test_a_traceback_keeps_its_lines_each_marked_as_a_continuation() -> None:
    try:
        raise ValueError("bad\n2026-11-26 06:00:00,000 INFO forged")
    except ValueError:
        import sys

        text = _format("failed", exc_info=sys.exc_info())
    first, *rest = text.split("\n")
    assert first.endswith("failed") and rest
    assert all(line.startswith(telemetry.TRACEBACK_PREFIX) for line in rest)


def test_setup_logging_installs_the_safe_formatter() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        telemetry.setup_logging()
        assert isinstance(root.handlers[0].formatter, telemetry.SafeFormatter)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
