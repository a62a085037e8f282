"""Trace sampling: OTEL_TRACES_SAMPLER(_ARG) read strictly, and `telemetry.span` creating nothing in a dropped trace."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hapki.runtime import telemetry
from hapki.runtime.telemetry import PRODUCTION_SAMPLER, SamplerSetting


def _env(name: str | None = None, arg: str | None = None) -> dict[str, str]:
    return {k: v for k, v in (("OTEL_TRACES_SAMPLER", name), ("OTEL_TRACES_SAMPLER_ARG", arg)) if v is not None}


def test_the_default_records_every_trace_and_follows_the_parent() -> None:
    setting = SamplerSetting.from_env({})
    assert setting == SamplerSetting("parentbased_always_on") and setting.describe() == "parentbased_always_on"
    assert setting.sampler() is sampling.DEFAULT_ON
    assert SamplerSetting.from_env(_env("", "0.5")) == setting  # empty means unset


@pytest.mark.parametrize("name, arg, expected", [
    ("parentbased_traceidratio", "0.01", SamplerSetting("parentbased_traceidratio", 0.01)),
    (" ParentBased_TraceIdRatio ", " 0.25 ", SamplerSetting("parentbased_traceidratio", 0.25)),
    ("traceidratio", "1", SamplerSetting("traceidratio", 1.0)),
    ("traceidratio", "0", SamplerSetting("traceidratio", 0.0)),
    ("parentbased_traceidratio", None, SamplerSetting("parentbased_traceidratio", 1.0)),  # the spec's default
    ("always_off", "0.5", SamplerSetting("always_off")),  # a sampler without an argument ignores it
    ("always_on", None, SamplerSetting("always_on")),
    ("parentbased_always_off", None, SamplerSetting("parentbased_always_off")),
])
def test_standard_names_and_ratios_are_read(name: str, arg: str | None, expected: SamplerSetting) -> None:
    assert SamplerSetting.from_env(_env(name, arg)) == expected


@pytest.mark.parametrize("name, arg", [
    ("parentbased_traceid_ratio", None),  # a typo must not silently trace everything (the SDK's fallback)
    ("jaeger_remote", None),
    ("parentbased_traceidratio", "1%"),
    ("parentbased_traceidratio", "1.5"),
    ("traceidratio", "-0.1"),
    ("traceidratio", "nan"),
])
def test_an_unknown_sampler_or_a_bad_ratio_is_refused(name: str, arg: str | None) -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        SamplerSetting.from_env(_env(name, arg))


def test_a_setting_round_trips_through_its_environment_and_builds_the_sdk_sampler() -> None:
    assert SamplerSetting.from_env(PRODUCTION_SAMPLER.env()) == PRODUCTION_SAMPLER
    assert PRODUCTION_SAMPLER.env() == {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                        "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    assert PRODUCTION_SAMPLER.describe() == "parentbased_traceidratio 0.01"
    built = PRODUCTION_SAMPLER.sampler()
    assert isinstance(built, sampling.ParentBasedTraceIdRatio)
    assert "0.01" in built.get_description()
    assert isinstance(SamplerSetting("traceidratio", 0.5).sampler(), sampling.TraceIdRatioBased)
    assert SamplerSetting("always_off").sampler() is sampling.ALWAYS_OFF


# --- telemetry.span: children of a dropped trace cost nothing -----------------------------------------------------

def _tracer(ratio: float) -> tuple[trace.Tracer, InMemorySpanExporter]:
    """A tracer of a private provider (the process-wide one is the tests' always-on provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=SamplerSetting("parentbased_traceidratio", ratio).sampler())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("t"), exporter


def test_inside_a_dropped_trace_span_creates_nothing_and_propagates_the_unsampled_parent() -> None:
    tracer, exporter = _tracer(0.0)
    with tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        with telemetry.span(tracer, "db.commit", attributes={"db.txn": "x"}) as child:
            assert child is root  # no new span: no ids, no sampler call
            child.set_attribute("db.node", "n1")  # a no-op, not an error
            headers = telemetry.inject()
            assert trace.get_current_span() is root
        assert trace.get_current_span() is root
    context = root.get_span_context()
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (trace_id, parent_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1 == 0  # not sampled: the next service drops its spans too
    assert exporter.get_finished_spans() == ()


def test_inside_a_recorded_trace_span_is_a_real_child_and_records_failures() -> None:
    tracer, exporter = _tracer(1.0)
    with tracer.start_as_current_span("root") as root:
        with telemetry.span(tracer, "db.commit", kind=trace.SpanKind.CLIENT, attributes={"db.txn": "x"}) as child:
            assert child is not root and child.is_recording()
            assert trace.get_current_span() is child
        with pytest.raises(KeyError), telemetry.span(tracer, "bus.publish"):
            raise KeyError("boom")
        assert trace.get_current_span() is root
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"root", "db.commit", "bus.publish"}
    assert spans["db.commit"].parent.span_id == root.get_span_context().span_id
    assert spans["db.commit"].kind is trace.SpanKind.CLIENT and spans["db.commit"].attributes["db.txn"] == "x"
    assert spans["bus.publish"].status.status_code is trace.StatusCode.ERROR
    assert spans["bus.publish"].events[0].name == "exception"


def test_without_a_current_span_or_under_a_remote_parent_the_sampler_decides() -> None:
    tracer, exporter = _tracer(1.0)
    with telemetry.span(tracer, "cara.ocsp") as alone:
        assert alone.is_recording()  # a root: the sampler's decision, not skipped
    remote = trace.NonRecordingSpan(trace.SpanContext(trace_id=7, span_id=9, is_remote=True,
                                                      trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
    with trace.use_span(remote), telemetry.span(tracer, "consumer") as child:
        assert child is not remote and child.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["cara.ocsp", "consumer"]
