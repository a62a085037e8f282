"""`hapki bench`: issuance throughput and latency on a local stack, and where the time goes, from the traces.

Step 1: pre-generate a pool of P-256 CSRs (client-side key generation is not measured), start a LocalStack
        that writes spans to `traces.jsonl`, and set up this process's tracing into the same file.
Step 2: per concurrency level, run `level` closed-loop clients on one NATS connection: a warm-up, then
        `seconds` measured. Every request gets a root span `bench.issue`; its latency and trace id are kept
        if it started inside the measured window. Every loop stops by itself at the end of the window.
Step 3: read the services' CPU time around each window and, at the end, their peak RSS (VmHWM).
Step 4: stop the stack (the services flush their spans on SIGTERM) and split each level's traces by stage
        with `hapki.lab.traces.stage_breakdown`.

Everything shares this machine's cores: NATS, MariaDB, CARA, CLM and the load generator itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hapki.cli.demo import setup_tracing, sigterm_as_interrupt, start_stack
from hapki.cli.procstat import ProcessGroups, machine_busy_seconds, per_issuance_ms
from hapki.contracts.models import IssueCertificate
from hapki.lab.stack import LocalStack
from hapki.lab.traces import DB_PARTS, STAGES, issuance_stages, load_spans, percentile, stage_breakdown

WARMUP_SECONDS = 1.0
REQUEST_TIMEOUT_SECONDS = 15.0  # CLM answers "pending" after its wait_seconds (10 s); this bounds a stuck call
CSR_POOL_MAX = 256
# The SDK's batch span processor drops spans once its queue (default 2048) is full; at a few hundred
# issuances/s with ~10 spans each that can happen between exports, and dropped spans make traces incomplete.
SPAN_QUEUE_SIZE = "65536"
PROCESSES = ("clm", "cara", "mariadbd", "nats-server", "bench-client")


@dataclass
class LevelResult:
    """What one concurrency level measured (times in ms)."""

    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # successful requests started in the window
    trace_ids: list[str] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    machine_busy_seconds: float | None = None  # all processes, ours or not: shows a machine that was not quiet

    def summary(self, spans: list[dict[str, Any]]) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        wanted = set(self.trace_ids)
        mine = [s for s in spans if s.get("trace_id") in wanted]
        per_trace = issuance_stages(mine)
        stage_ms = {k: statistics.fmean(t[k] for t in per_trace.values()) for k in ("e2e", *STAGES, *DB_PARTS)} \
            if per_trace else {}
        return {
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "requests": len(ordered),
            "rate_per_s": len(ordered) / self.seconds,
            "latency_ms": {
                "p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
                "max": ordered[-1] if ordered else None,
                "mean": statistics.fmean(ordered) if ordered else None,
            },
            "errors": self.errors,
            "error_samples": self.error_samples,
            "traces_analysed": len(per_trace),
            "stages": stage_breakdown(mine),
            "stage_ms": stage_ms,
            "cpu_percent": {k: 100 * v / self.seconds for k, v in self.cpu_seconds.items()},
            "cpu_ms_per_issuance": per_issuance_ms(self.cpu_seconds, len(ordered)),
            "machine_cpu_percent": None if self.machine_busy_seconds is None
            else 100 * self.machine_busy_seconds / self.seconds,
        }


def _csr_pool(size: int) -> list[IssueCertificate]:
    from hapki.cli.client import new_key_and_csr

    return [
        IssueCertificate(csr_pem=new_key_and_csr([f"bench-{i}.example.com"])[0].decode(), profile="tls-server",
                         requester="hapki-bench")
        for i in range(size)
    ]


def _pids(stack: LocalStack) -> dict[str, int | None]:
    return {
        "clm": stack.clm.pid if stack.clm else None,
        "cara": stack.cara.pid if stack.cara else None,
        "mariadbd": stack.env.db.pid,
        "nats-server": stack.env.nats.pid,
        "bench-client": os.getpid(),
    }


def _groups(pids: dict[str, int | None]) -> ProcessGroups:
    """The services with their descendants (signer processes); this process, their parent, alone."""
    return ProcessGroups({name: [pid] for name, pid in pids.items()}, alone=["bench-client"])


async def _run_level(
    nats: Any, concurrency: int, seconds: float, warmup: float, pool: list[IssueCertificate],
    pids: dict[str, int | None],
) -> LevelResult:
    from opentelemetry import trace

    from hapki.cli.client import ClmClient

    tracer = trace.get_tracer("hapki.bench")
    result = LevelResult(concurrency=concurrency, seconds=seconds)
    client = await ClmClient.connect(nats, timeout=REQUEST_TIMEOUT_SECONDS)
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + seconds

    async def loop(index: int) -> None:
        n = index
        while (began := time.perf_counter()) < window_end:
            request = pool[n % len(pool)]
            n += concurrency
            error: str | None = None
            with tracer.start_as_current_span("bench.issue") as span:
                try:
                    reply = await client.issue(request)
                    if reply.error is not None:
                        error = f"{reply.error.code.value}: {reply.error.message}"
                    elif not reply.certificate_pem:
                        error = f"no certificate; request {reply.status.value if reply.status else '?'}"
                except Exception as exc:  # a timeout or a lost connection is a failed request, not a crash
                    error = f"{type(exc).__name__}: {exc}"
                trace_id = format(span.get_span_context().trace_id, "032x")
            took_ms = (time.perf_counter() - began) * 1000
            if began < window_start:
                continue  # warm-up
            if error is None:
                result.latencies_ms.append(took_ms)
                result.trace_ids.append(trace_id)
            else:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(error)

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        groups = _groups(pids)  # descendants (signer processes) too
        groups.start()
        machine_before = machine_busy_seconds()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        result.machine_busy_seconds = machine_busy_seconds() - machine_before
        result.cpu_seconds.update({name: cpu for name, cpu in groups.stop().items() if pids[name]})

    try:
        await asyncio.gather(sample_cpu(), *(loop(i) for i in range(concurrency)))
    finally:
        await client.close()
    return result


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"hapki bench: {report['cores']} cores, shared by NATS, MariaDB, CARA, CLM and this load generator.",
        f"Each level: {report['warmup_seconds']:.1f} s warm-up, then {report['seconds']:.1f} s measured; "
        "closed-loop clients, fresh P-256 CSRs from a pool, profile tls-server; trace sampler "
        f"{report.get('sampler', 'parentbased_always_on')} (the stage split reads the traces it keeps).",
        "",
        f"{'clients':>7}  {'issued/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  {'errors':>6}",
    ]
    for level in report["levels"]:
        lat = level["latency_ms"]
        lines.append(f"{level['concurrency']:>7}  {level['rate_per_s']:>8.1f}  {_fmt(lat['p50']):>7}  "
                     f"{_fmt(lat['p99']):>7}  {_fmt(lat['max']):>7}  {level['errors']:>6}")
    for level in report["levels"]:
        for sample in level["error_samples"]:
            lines.append(f"  {level['concurrency']} clients, error: {sample}")
    lines += ["", "Where the end-to-end time goes: share (mean ms per request), from each level's traces "
              "(definitions: hapki.lab.traces)"]
    header = f"{'clients':>7}  {'traces':>6}" + "".join(f"  {k:>13}" for k in (*STAGES, *DB_PARTS))
    lines.append(header)
    for level in report["levels"]:
        shares, means = level["stages"], level["stage_ms"]
        cells = "".join(
            f"  {f'{100 * shares[k]:.0f}% ({means[k]:.1f})':>13}" if k in shares else f"  {'-':>13}"
            for k in (*STAGES, *DB_PARTS)
        )
        lines.append(f"{level['concurrency']:>7}  {level['traces_analysed']:>6}{cells}")
    lines += ["", f"CPU during the measured window, % of one core (all {report['cores']} cores = "
              f"{100 * report['cores']}%)"]
    lines.append(f"{'clients':>7}" + "".join(f"  {k:>12}" for k in PROCESSES) + f"  {'total':>7}  {'machine':>7}")
    for level in report["levels"]:
        cpu = level["cpu_percent"]
        lines.append(f"{level['concurrency']:>7}" + "".join(f"  {_fmt(cpu.get(k), '.0f'):>12}" for k in PROCESSES)
                     + f"  {sum(cpu.values()):>7.0f}  {_fmt(level['machine_cpu_percent'], '.0f'):>7}")
    lines.append("  (machine: every process on this host; well above total means other load skewed the figures)")
    lines += ["", "CPU ms per issuance by process"]
    lines.append(f"{'clients':>7}" + "".join(f"  {k:>12}" for k in PROCESSES))
    for level in report["levels"]:
        per = level["cpu_ms_per_issuance"]
        lines.append(f"{level['concurrency']:>7}" + "".join(f"  {_fmt(per.get(k), '.2f'):>12}" for k in PROCESSES))
    rss = report["rss_peak_mib"]
    lines += ["", "Peak RSS (VmHWM) over the whole run, MiB: "
              + ", ".join(f"{k} {_fmt(rss.get(k), '.0f')}" for k in PROCESSES)]
    lines.append(f"Spans: {report['trace_file']}")
    return "\n".join(lines)


def _bench(base_dir: Path, levels: list[int], seconds: float, as_json: bool) -> int:
    from hapki.runtime import telemetry

    try:
        # Every trace by default (the stage split needs them); OTEL_TRACES_SAMPLER chooses another, for all processes.
        sampler = telemetry.SamplerSetting.from_env()
    except ValueError as exc:
        print(f"hapki bench: {exc}", file=sys.stderr)
        return 2
    trace_file = base_dir / "traces.jsonl"
    warmup = WARMUP_SECONDS
    _progress(f"hapki bench: generating a pool of P-256 CSRs, starting the local stack in {base_dir} ...")
    pool = _csr_pool(min(CSR_POOL_MAX, max(64, *levels)))
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", SPAN_QUEUE_SIZE)
    try:
        stack = start_stack(base_dir, trace_file)
    except (RuntimeError, OSError) as exc:
        print(f"hapki bench failed: could not start the local stack: {exc}\n(logs under {base_dir})",
              file=sys.stderr)
        return 1
    results: list[LevelResult] = []
    try:
        setup_tracing("hapki-bench", trace_file)
        pids = _pids(stack)
        for level in levels:
            _progress(f"  {level} clients: {warmup:.0f} s warm-up, then {seconds:g} s measured ...")
            result = asyncio.run(_run_level(stack.env.nats.nats_config("client"), level, seconds, warmup, pool, pids))
            results.append(result)
            _progress(f"  {level} clients: {len(result.latencies_ms) / seconds:.1f} issued/s, "
                      f"{result.errors} errors")
        rss = _groups(pids).peak_rss_mib()
    finally:
        _progress("  stopping the stack (the services flush their spans) ...")
        stack.stop()
        telemetry.shutdown()
    spans = load_spans(trace_file)
    report = {
        "cores": os.cpu_count(),
        "seconds": seconds,
        "warmup_seconds": warmup,
        "levels": [r.summary(spans) for r in results],
        "rss_peak_mib": rss,
        "trace_file": str(trace_file),
        "sampler": sampler.describe(),
    }
    print(json.dumps(report, indent=2) if as_json else _table(report))
    return 0 if all(r.latencies_ms for r in results) else 1


def run_bench(base_dir: Path, levels: list[int], seconds: float, as_json: bool) -> int:
    """Benchmark issuance at each concurrency level for `seconds` each; print a table or JSON; 0 if all issued."""
    if not levels or any(level < 1 for level in levels) or seconds <= 0:
        print("hapki bench: concurrency levels must be positive integers and --seconds positive", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            return _bench(Path(base_dir).resolve(), levels, seconds, as_json)
    except KeyboardInterrupt:
        print("hapki bench interrupted; everything it started is stopped", file=sys.stderr)
        return 130
