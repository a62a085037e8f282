"""Read the JSON-lines span file of a local stack: load it, draw one trace as a tree, split issuance time by stage.

The file is written by `hapki.runtime.telemetry.JsonLinesSpanExporter` in every process that has
HAPKI_TRACE_FILE set; one span per line with trace_id, span_id, parent_id, name, service, start_ns, end_ns,
status and attributes. All processes run on one host, so their start/end times share one clock and may be
subtracted across services (across hosts this would need synchronised clocks).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hapki.runtime.telemetry import span_files

__all__ = ["DB_PARTS", "KEY_ATTRIBUTES", "STAGES", "issuance_stages", "load_spans", "percentile", "stage_breakdown",
           "stage_table", "trace_tree", "spans_of_request", "traces_of_request"]

log = logging.getLogger(__name__)

Span = Mapping[str, Any]

# Attributes worth a glance in a tree line: they tie a span to rows in the database and to an HSM member.
KEY_ATTRIBUTES = ("pki.request_id", "pki.serial", "db.txn", "hsm.member")

# Stages of one issuance, in path order; their times add up to the end-to-end time (see issuance_stages).
# db_clm and db_cara are the two parts of db, reported besides it.
STAGES = ("client", "clm", "bus", "cara", "hsm", "db")
DB_PARTS = ("db_clm", "db_cara")

_NAME_WIDTH = 44  # long FastStream span names (reply inboxes) are cut to keep the columns aligned


def load_spans(path: Path | str) -> list[dict[str, Any]]:
    """All spans in a JSON-lines span file and the files it rotated into, oldest first (empty if none exists).

    Writers append while we read, so the last line may be cut short: it is skipped silently. A malformed line
    elsewhere (two writers interleaving) is skipped with a warning rather than failing the whole read. A rotation
    during the read (at HAPKI_TRACE_FILE_MAX_MB) may repeat or miss one file's spans.
    """
    return [span for found in span_files(path) for span in _load_file(found)]


def _load_file(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # rotated away while we listed
        return []
    lines = data.split(b"\n")
    spans: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            span = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number < len(lines):  # not the (possibly half-written) last line
                log.warning("%s:%d: skipped a malformed span line", path, number)
            continue
        if isinstance(span, dict):
            spans.append(span)
    return spans


def _ms(ns: float) -> float:
    return ns / 1e6


def _duration_ns(span: Span) -> int:
    return int(span["end_ns"]) - int(span["start_ns"])


def trace_tree(spans: Iterable[Span], trace_id: str) -> str:
    """One trace as an indented tree, a line per span: name, service, duration, offset from the trace start.

    Offsets count from the earliest span start in the trace (normally the root). Children are ordered by start
    time; a span whose parent is not in the list (not exported yet, or dropped) is shown as a root of its own.
    Each line ends with the key attributes (KEY_ATTRIBUTES) and ERROR for a failed span.
    """
    mine = [s for s in spans if s.get("trace_id") == trace_id]
    if not mine:
        return f"(no spans of trace {trace_id})"
    ids = {s["span_id"] for s in mine}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in mine:
        parent = span.get("parent_id")
        children[parent if parent in ids else None].append(span)
    for kids in children.values():
        kids.sort(key=lambda s: (int(s["start_ns"]), s["name"]))
    origin = min(int(s["start_ns"]) for s in mine)

    rows: list[tuple[str, str, str, str, str]] = []
    seen: set[str] = set()

    def walk(span: Span, depth: int) -> None:
        if span["span_id"] in seen:  # a malformed file with a parent cycle must not loop forever
            return
        seen.add(span["span_id"])
        name = "  " * depth + str(span["name"])
        if len(name) > _NAME_WIDTH:
            name = name[: _NAME_WIDTH - 3] + "..."
        attributes = span.get("attributes") or {}
        notes = [f"{k}={attributes[k]}" for k in KEY_ATTRIBUTES if k in attributes]
        if span.get("status") == "ERROR":
            notes.append("ERROR")
        rows.append((
            name, str(span.get("service") or "?"), f"{_ms(_duration_ns(span)):.2f} ms",
            f"+{_ms(int(span['start_ns']) - origin):.2f} ms", "  ".join(notes),
        ))
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in children[None]:
        walk(root, 0)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    header = ("span", "service", "took", "started", "")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    lines = []
    for row in [header, *rows]:
        line = f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def traces_of_request(spans: Iterable[Span], request_id: str) -> list[str]:
    """Ids of the traces holding a span whose pki.request_id is `request_id`, oldest first.

    Usually one; more when the client retried (each attempt is its own trace, joined in CLM to the first) or the
    request was queued again by CLM's outbox sweep.
    """
    starts: dict[str, int] = {}
    for span in spans:
        if (span.get("attributes") or {}).get("pki.request_id") == request_id:
            trace_id = str(span["trace_id"])
            starts[trace_id] = min(starts.get(trace_id, int(span["start_ns"])), int(span["start_ns"]))
    return sorted(starts, key=lambda t: starts[t])


def spans_of_request(paths: Iterable[Path | str], request_id: str) -> list[dict[str, Any]]:
    """The spans of every trace that names `request_id`, from JSON-lines span files, without parsing the rest.

    A lab's file grows to hundreds of thousands of spans; loading it whole costs seconds and most of a gigabyte.
    The exporter writes compact JSON, so a line is parsed only when it holds the request id (first pass, to learn
    the trace ids) or one of those trace ids (second pass).
    """
    files = [found for path in paths for found in span_files(path)]
    needle = json.dumps({"pki.request_id": request_id}, separators=(",", ":"))[1:-1].encode()
    trace_ids = {span["trace_id"] for path in files for span in _parsed(path, (needle,))}
    keys = tuple(json.dumps({"trace_id": t}, separators=(",", ":"))[1:-1].encode() for t in trace_ids)
    return [span for path in files for span in _parsed(path, keys) if span.get("trace_id") in trace_ids] if keys \
        else []


def _parsed(path: Path, needles: tuple[bytes, ...]) -> Iterator[dict[str, Any]]:
    """The spans on lines of `path` that contain one of `needles` (malformed lines skipped, as in load_spans)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:  # rotated away while we read the others
        return
    with fh:
        for line in fh:
            if any(n in line for n in needles):
                try:
                    span = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a half-written last line, or two writers interleaving: load_spans logs those
                if isinstance(span, dict) and "trace_id" in span:
                    yield span


def _by_trace(spans: Iterable[Span]) -> dict[str, list[Span]]:
    grouped: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        grouped[span["trace_id"]].append(span)
    return grouped


def _stages_of_trace(spans: list[Span]) -> dict[str, float] | None:
    """Stage times (ms) of one issuance trace, or None if the trace lacks a span the split needs."""
    by_id = {s["span_id"]: s for s in spans}

    def first(name: str) -> Span | None:
        named = [s for s in spans if s["name"] == name]
        return min(named, key=lambda s: int(s["start_ns"])) if named else None

    clm_issue, publish, client = first("clm.issue"), first("bus.publish"), first("client.issue")
    signs = [s for s in spans if s["name"] == "cara.sign"]
    hsm = [s for s in spans if s["name"] == "hsm.sign"]
    if clm_issue is None or publish is None or not signs or not hsm:
        return None
    clm_service, cara_service = clm_issue.get("service"), signs[0].get("service")
    # CLM's root span: climb from clm.issue while the parent is still a CLM span (FastStream's consumer span).
    clm_root = clm_issue
    while (parent := by_id.get(clm_root.get("parent_id"))) is not None and parent.get("service") == clm_service:
        clm_root = parent
    sign_start = min(int(s["start_ns"]) for s in signs)
    sign_end = max(int(s["end_ns"]) for s in signs)
    commits = [s for s in spans if s["name"] == "db.commit"]
    db_clm = sum(_duration_ns(s) for s in commits if s.get("service") == clm_service)
    db_cara = sum(_duration_ns(s) for s in commits if s.get("service") == cara_service)
    hsm_ns = sum(_duration_ns(s) for s in hsm)
    bus = (sign_start - int(publish["start_ns"])) + (int(clm_issue["end_ns"]) - sign_end)
    cara = (sign_end - sign_start) - hsm_ns - db_cara
    clm = _duration_ns(clm_root) - (int(clm_issue["end_ns"]) - int(publish["start_ns"])) - db_clm
    end_to_end = _duration_ns(client) if client is not None else _duration_ns(clm_root)
    times = {
        "e2e": end_to_end, "client": end_to_end - _duration_ns(clm_root), "clm": clm, "bus": bus, "cara": cara,
        "hsm": hsm_ns, "db": db_clm + db_cara, "db_clm": db_clm, "db_cara": db_cara,
    }
    return {k: _ms(v) for k, v in times.items()}


def issuance_stages(spans: Iterable[Span]) -> dict[str, dict[str, float]]:
    """Per complete issuance trace (trace id -> stage -> ms): where its end-to-end time went.

    A trace counts as complete when it holds clm.issue, bus.publish, cara.sign and hsm.sign; others are left
    out. With P = bus.publish, C = the cara.sign span(s) (first start .. last end: a redelivery's gap counts as
    CARA), I = clm.issue and R = CLM's root span (the topmost CLM span above I, FastStream's consumer span):

    - e2e     = duration of client.issue (what the client saw); without a client span, duration of R.
    - client  = e2e - R: the request's and the reply's trip through NATS, the wait in CLM's subscription
                before its handler starts (CLM's queueing under load shows up here), and the client's own work.
    - clm     = R - (I.end - P.start) - db_clm: CLM's own processing (decode, validation, reply encoding)
                before it hands the request to the bus and after the result is back.
    - bus     = (C.start - P.start) + (I.end - C.end): JetStream publish and ack, waiting in the work queue
                for a free CARA worker and the fetch, then the result event back to CLM, CLM's event handler and
                its event loop waking clm.issue. Queueing in either service's event loop shows up here.
    - cara    = (C.end - C.start) - hsm - db_cara: CARA's own processing (CSR parsing, certificate building,
                thread hand-offs, ack, publishing the result).
    - hsm     = sum of hsm.sign durations (including the wait for the process-wide PKCS#11 lock).
    - db_clm / db_cara = sum of db.commit durations in the CLM / CARA service (each a whole transaction,
                retries included); db = db_clm + db_cara.

    client + clm + bus + cara + hsm + db == e2e for each trace.
    """
    result: dict[str, dict[str, float]] = {}
    for trace_id, spans_of_trace in _by_trace(spans).items():
        stages = _stages_of_trace(spans_of_trace)
        if stages is not None:
            result[trace_id] = stages
    return result


def stage_breakdown(spans: Iterable[Span]) -> dict[str, float]:
    """Share (0..1) of the total end-to-end time of the complete issuance traces in `spans`, by stage.

    Keys: client, clm, bus, cara, hsm, db (these add up to 1) and db_clm, db_cara (the two parts of db).
    Each share is the stage's time summed over all complete traces divided by their summed end-to-end time,
    so slow requests weigh more than fast ones. How each stage's time is cut out of a trace is documented in
    `issuance_stages`. Empty dict if there is no complete issuance trace.
    """
    per_trace = issuance_stages(spans).values()
    total = sum(t["e2e"] for t in per_trace)
    if not per_trace or total <= 0:
        return {}
    return {key: sum(t[key] for t in per_trace) / total for key in (*STAGES, *DB_PARTS)}


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of an ascending sequence; None if it is empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stage_table(per_trace: Mapping[str, Mapping[str, float]], *, slowest: int = 0) -> str:
    """`issuance_stages`' result as text: per stage, p50/p90/p99/max/mean in ms (nearest rank) over the traces and
    its share of their summed end-to-end time; then the ids and end-to-end times of the `slowest` traces.

    Where a request's time goes across many requests (the tail, not one trace): under load a stage's p99 shows
    where requests wait, its share where the time of all of them goes. Percentiles of each stage are taken on
    their own, so the p99 column does not add up to the end-to-end p99.
    """
    if not per_trace:
        return "no complete issuance trace (clm.issue, bus.publish, cara.sign and hsm.sign in one trace)"
    keys = ("e2e", *STAGES, *DB_PARTS)
    total = sum(t["e2e"] for t in per_trace.values()) or 1.0
    lines = [f"{len(per_trace)} issuance traces; ms per stage (nearest rank); share of the summed end-to-end time",
             f"{'stage':<8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8} {'share':>6}"]
    for key in keys:
        values = sorted(t[key] for t in per_trace.values())
        p50, p90, p99 = (percentile(values, p) or 0.0 for p in (50, 90, 99))
        share = "" if key == "e2e" else f"{sum(values) / total:6.0%}"
        lines.append(f"{key:<8} {p50:8.1f} {p90:8.1f} {p99:8.1f} {values[-1]:8.1f} {sum(values) / len(values):8.1f}"
                     f" {share:>6}")
    if slowest > 0:
        shown = min(slowest, len(per_trace))
        lines.append(f"slowest {shown} (trace id, end-to-end ms, then the stage that took most):")
        ranked = sorted(per_trace.items(), key=lambda item: item[1]["e2e"], reverse=True)[:slowest]
        for trace_id, times in ranked:
            worst = max(STAGES, key=lambda stage: times[stage])
            lines.append(f"  {trace_id} {times['e2e']:8.1f}  {worst} {times[worst]:.1f}")
    return "\n".join(lines)
