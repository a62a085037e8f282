"""OpenTelemetry set-up and W3C trace-context propagation over NATS headers; logs that carry trace ids.

Exporters come from the standard OTEL_* environment (OTLP/HTTP traces and metrics when OTEL_EXPORTER_OTLP_ENDPOINT,
or the per-signal OTEL_EXPORTER_OTLP_TRACES_/METRICS_ENDPOINT, is set). Metrics are always readable by Prometheus
(hapki.runtime.metrics: each `hapki serve` process serves /metrics).
HAPKI_TRACE_FILE adds a JSON-lines span file: the local environment's collector, read by `hapki demo`/`bench`/`trace`;
it rotates by size (HAPKI_TRACE_FILE_MAX_MB, default 256; HAPKI_TRACE_FILE_BACKUPS rotated files kept, default 3).

Sampling: the standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, read strictly (SamplerSetting.from_env: an
unknown name or a bad ratio stops the start instead of silently tracing everything). The default stays
parentbased_always_on: the lab, the demos, `hapki trace`, the chaos runs and `hapki bench --concurrency` read
every trace. PRODUCTION_SAMPLER is what an operator runs under load (and what `hapki bench --compare` measures
with). Inside a trace the sampler dropped, `span()` makes no child spans at all, so an unsampled request costs
one root decision, not a span per step.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import math
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger("hapki.telemetry")

SAMPLER_ENV = "OTEL_TRACES_SAMPLER"
SAMPLER_ARG_ENV = "OTEL_TRACES_SAMPLER_ARG"
# The standard names (OpenTelemetry SDK environment variables); the ratio ones take OTEL_TRACES_SAMPLER_ARG.
_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
             "parentbased_traceidratio")
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")


@dataclass(frozen=True)
class SamplerSetting:
    """Which traces are recorded: a standard sampler name and, for the ratio samplers, the fraction of traces."""

    name: str = "parentbased_always_on"
    ratio: float | None = None  # traceidratio, parentbased_traceidratio: 0.0 .. 1.0 (the spec's default is 1.0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SamplerSetting:
        """The setting OTEL_TRACES_SAMPLER(_ARG) in `env` (default: os.environ) ask for; ValueError if invalid.

        Stricter than the SDK, which logs a warning and traces everything: a typo must not turn sampling off
        unnoticed on a production host. The argument of a sampler that takes none is ignored, as the spec says.
        """
        env = os.environ if env is None else env
        name = env.get(SAMPLER_ENV, "").strip().lower() or cls.name
        if name not in _SAMPLERS:
            raise ValueError(f"{SAMPLER_ENV}={env.get(SAMPLER_ENV)!r} is not a sampler hapki knows; "
                             f"one of {', '.join(_SAMPLERS)}")
        if name not in _RATIO_SAMPLERS:
            return cls(name)
        raw = env.get(SAMPLER_ARG_ENV, "").strip()
        if not raw:
            return cls(name, 1.0)
        try:
            ratio = float(raw)
        except ValueError:
            ratio = math.nan
        if not 0.0 <= ratio <= 1.0:  # NaN fails too
            raise ValueError(f"{SAMPLER_ARG_ENV}={raw!r}: {name} takes the fraction of traces to record, 0 to 1")
        return cls(name, ratio)

    def sampler(self) -> sampling.Sampler:
        """The SDK sampler of this setting."""
        fixed = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
                 "parentbased_always_on": sampling.DEFAULT_ON, "parentbased_always_off": sampling.DEFAULT_OFF}
        if self.name in fixed:
            return fixed[self.name]
        ratio = 1.0 if self.ratio is None else self.ratio
        if self.name == "traceidratio":
            return sampling.TraceIdRatioBased(ratio)
        return sampling.ParentBasedTraceIdRatio(ratio)

    def env(self) -> dict[str, str]:
        """The environment that asks a hapki process (or any OpenTelemetry SDK) for this setting."""
        return {SAMPLER_ENV: self.name} | ({SAMPLER_ARG_ENV: f"{self.ratio:g}"} if self.ratio is not None else {})

    def describe(self) -> str:
        return self.name if self.ratio is None else f"{self.name} {self.ratio:g}"


# What to run under production load: 1% of the traces of requests that arrive without a sampling decision, and
# whatever decision a caller's traceparent carries. Spans cost 6-13% of CLM's and CARA's CPU when every request
# is traced (docs/PERFORMANCE.md); a hundredth of that is noise, and 1% of a few hundred requests/s is still
# several complete traces a second to look at.
PRODUCTION_SAMPLER = SamplerSetting("parentbased_traceidratio", 0.01)


TRACE_FILE_ENV = "HAPKI_TRACE_FILE"
TRACE_FILE_MAX_MB_ENV = "HAPKI_TRACE_FILE_MAX_MB"
TRACE_FILE_BACKUPS_ENV = "HAPKI_TRACE_FILE_BACKUPS"


@dataclass(frozen=True)
class SpanFileLimits:
    """How large the span file grows: at `max_bytes` it becomes `<file>.1` (`.1` becomes `.2`, ...), and at most
    `backups` such files are kept; the oldest spans go. The default keeps at most 1 GiB (about 2.5 million spans,
    250,000 traced issuances) where a file of every trace of a long soak used to fill the disk."""

    max_bytes: int = 256 * 1024 * 1024
    backups: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SpanFileLimits:
        """The limits HAPKI_TRACE_FILE_MAX_MB (a positive number) and HAPKI_TRACE_FILE_BACKUPS (0 or more) ask
        for; ValueError naming the variable if one is not valid (the start stops, as for the sampler)."""
        env = os.environ if env is None else env
        limits = cls()
        raw_mb = env.get(TRACE_FILE_MAX_MB_ENV, "").strip()
        raw_backups = env.get(TRACE_FILE_BACKUPS_ENV, "").strip()
        try:
            mb = float(raw_mb) if raw_mb else limits.max_bytes / 2**20
        except ValueError:
            mb = math.nan
        if not 0 < mb < 2**40:  # NaN and inf fail too
            raise ValueError(f"{TRACE_FILE_MAX_MB_ENV}={raw_mb!r}: the span file's size before it rotates, in MiB, > 0")
        try:
            backups = int(raw_backups) if raw_backups else limits.backups
        except ValueError:
            backups = -1
        if not 0 <= backups <= 1000:
            raise ValueError(f"{TRACE_FILE_BACKUPS_ENV}={raw_backups!r}: how many rotated span files to keep, 0-1000")
        return cls(max(1, int(mb * 2**20)), backups)


def span_files(path: Path | str) -> list[Path]:
    """The span file and its rotated predecessors that exist, oldest first (`<file>.N` ... `<file>.1`, `<file>`)."""
    path = Path(path)
    rotated: list[tuple[int, Path]] = []
    for candidate in path.parent.glob(path.name + ".*"):
        suffix = candidate.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def remove_span_files(path: Path | str) -> None:
    """Remove the span file and every rotated one (a demo's or a benchmark's fresh start)."""
    for found in span_files(path):
        found.unlink(missing_ok=True)


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file, which several processes may share; rotated by size.

    Each export opens the file, appends under an exclusive lock (flock on `<file>.lock`, shared by every
    writing process) and closes it: once a writer renamed the file away at `limits.max_bytes`, every writer's
    next export starts the new one. Readers take the rotated files too (span_files). A failed write (a full
    disk) drops that batch of spans, logged, and never reaches the request that made them.
    """

    def __init__(self, path: str, limits: SpanFileLimits | None = None) -> None:
        self._path = Path(path)
        self._limits = limits or SpanFileLimits()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = ("\n".join(json.dumps(span_to_dict(s), separators=(",", ":")) for s in spans) + "\n").encode()
        try:
            with self._lock, open(self._path.with_name(self._path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                self._rotate_if_full(len(data))
                with open(self._path, "ab") as fh:
                    fh.write(data)
        except OSError as exc:
            log.warning("could not write %d spans to %s: %s", len(spans), self._path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _rotate_if_full(self, adding: int) -> None:
        try:
            size = self._path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + adding <= self._limits.max_bytes:
            return
        if self._limits.backups == 0:
            self._path.unlink()
            return
        name = self._path.name
        for number in range(self._limits.backups - 1, 0, -1):
            older = self._path.with_name(f"{name}.{number}")
            if older.exists():
                older.replace(self._path.with_name(f"{name}.{number + 1}"))
        self._path.replace(self._path.with_name(f"{name}.1"))

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


def check_env(env: Mapping[str, str] | None = None) -> None:
    """ValueError naming the variable if the tracing environment (the sampler, the span file's limits) is not
    valid: `hapki serve` checks it before it starts anything, so a typo is one line, not a traceback per restart."""
    SamplerSetting.from_env(env)
    if (os.environ if env is None else env).get(TRACE_FILE_ENV):
        SpanFileLimits.from_env(env)


def setup(service_name: str) -> None:
    """Install the global tracer provider for this process, unless one is installed already (tests)."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    resource = Resource.create({"service.name": service_name})
    from hapki.runtime.metrics import install_provider  # the Prometheus reader (+ OTLP when configured)

    install_provider(resource)
    setting = SamplerSetting.from_env()
    provider = TracerProvider(resource=resource, sampler=setting.sampler())
    log.info("tracing %s: sampler %s", service_name, setting.describe())
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if path := os.environ.get(TRACE_FILE_ENV):
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path, SpanFileLimits.from_env())))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
    meters = metrics.get_meter_provider()
    if hasattr(meters, "shutdown"):
        meters.shutdown()


def span(tracer: trace.Tracer, name: str, *, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
         attributes: Mapping[str, Any] | None = None) -> _ChildSpan:
    """A child of the current span, made current (as tracer.start_as_current_span); none inside a dropped trace.

    When the current span is a local one the sampler did not record, `with span(...) as s` yields that span and
    creates nothing: no ids, no sampler call, no attributes, no context switch. Every standard sampler would drop
    the child too (the parent-based ones follow the parent; the ratio ones decide by the trace id, the parent's;
    always_off drops all; always_on never leaves a local span unrecorded). Calls on the yielded span are no-ops,
    and the trace context that goes on (traceparent) is the parent's: same trace, not sampled, so the next service
    drops it too. Spans that start from a remote parent or a chosen context (consumers, HTTP servers) are where
    the sampler decides: start those with the tracer.
    """
    return _ChildSpan(tracer, name, kind, attributes)


class _ChildSpan:
    """The context manager of span(): a class, not a generator, since it wraps every traced step of every request."""

    __slots__ = ("_attributes", "_kind", "_name", "_started", "_tracer")

    def __init__(self, tracer: trace.Tracer, name: str, kind: trace.SpanKind,
                 attributes: Mapping[str, Any] | None) -> None:
        self._tracer, self._name, self._kind, self._attributes = tracer, name, kind, attributes
        self._started: Any = None  # the tracer's context manager, when a span was started

    def __enter__(self) -> trace.Span:
        current = trace.get_current_span()
        parent = current.get_span_context()
        if parent.is_valid and not parent.is_remote and not current.is_recording():
            return current
        self._started = self._tracer.start_as_current_span(self._name, kind=self._kind, attributes=self._attributes)
        return self._started.__enter__()

    def __exit__(self, *exc_info: Any) -> bool | None:
        started, self._started = self._started, None
        return started.__exit__(*exc_info) if started is not None else None


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


# asyncio's TLS transport (and uvloop's) logs this WARNING when the protocol above it returns True from
# eof_received(). asyncio's own StreamReaderProtocol returns False over TLS, but it learns that it runs over TLS only
# in connection_made(), and nats-py upgrades its connection with loop.start_tls() and a fresh protocol that never
# gets that call (nats-io/nats.py#574). So every NATS connection over TLS logged it once when it ended: at each stop,
# failover and bus node lost, beside our own "nats disconnected". It carries nothing more: the transport closes either
# way. Only this exact message is dropped, and only from the asyncio logger.
ASYNCIO_TLS_EOF_NOISE = "returning true from eof_received() has no effect when using ssl"


class AsyncioTlsEofNoise(logging.Filter):
    """Drops ASYNCIO_TLS_EOF_NOISE (installed on the `asyncio` logger by setup_logging); passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != ASYNCIO_TLS_EOF_NOISE


def quiet_asyncio_tls_eof() -> None:
    """Install AsyncioTlsEofNoise on the `asyncio` logger, once: the services (setup_logging) and every `hapki`
    command (the benches and the lab talk to NATS over TLS too) drop the message."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, AsyncioTlsEofNoise) for f in asyncio_log.filters):
        asyncio_log.addFilter(AsyncioTlsEofNoise())


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


def setup_logging(level: str = "INFO", *, process: str | None = None) -> None:
    """Structured one-line logs with the trace id, to stderr; control characters escaped (SafeFormatter); asyncio's
    TLS EOF noise dropped (AsyncioTlsEofNoise).

    `process`: set in a helper process that logs into its parent's stream (a CARA signer worker), appended to
    every record's logger name, e.g. `hapki.cara.signer[cara-1 signer 2]`.
    """
    handler = logging.StreamHandler()
    handler.addFilter(TraceIdFilter())
    tagged = "%(name)s[" + process.replace("%", "%%") + "]" if process is not None else "%(name)s"
    fmt = LOG_FORMAT.replace("%(name)s", tagged)
    handler.setFormatter(SafeFormatter(fmt))
    quiet_asyncio_tls_eof()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("HAPKI_LOG_LEVEL", level))
