"""`hapki bench --growth N`: issuance rate and OCSP latency on an empty database, then with N certificates in it.

Step 1: a fresh local stack (NATS, MariaDB, SoftHSM, CARA with its HTTP endpoint, CLM); issue a few certificates,
        measure issuance (closed-loop clients over NATS, as `hapki bench`), OCSP (closed-loop POSTs for one
        certificate to CARA's /ocsp, plain HTTP, no haproxy: answered from CARA's memory cache after the first) and
        OCSP with a nonce (POSTs about NONCE_SERIALS certificates drawn at random from the database, each with a
        nonce: a status read of the database and an HSM signature every time, never cached) on the empty database.
Step 2: preload N certificates with bulk SQL: every row hapki writes for one issuance (request, names, signing
        intent, certificate, audit entries) cloned N times from a real issuance, with fresh ids, serials, names and
        times (`preload`). Not N signatures: the rows are what the queries see, not what the HSM did. The audit
        chain is not extended (clones are entries no chain link covers; `hapki audit verify` would say so).
        CLM and CARA are stopped meanwhile and started again after.
Step 3: let the restarted services settle as in step 1, measure again, and EXPLAIN every distinct statement the
        services ran during a few issuances and OCSP requests (captured from MariaDB's general log, so the list
        cannot drift from the code): a full table or index scan over more than SCAN_ROWS_LIMIT rows on the hot path
        is a finding.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from hapki.cli.bench import percentile
from hapki.cli.procstat import ProcessGroups, per_issuance_ms
# The statements of one COM_QUERY (the services send `UPDATE ...; INSERT ...; COMMIT` as one).
from hapki.runtime.migrate import split_sql as split_statements

CHUNK = 100_000  # rows per INSERT ... SELECT: bounded transactions, progress to show
PRELOAD_TIMEOUT_SECONDS = 3600.0  # one statement; re-building a table's indexes over 1M rows takes minutes
SCAN_ROWS_LIMIT = 1000  # EXPLAIN estimates above this for a full scan are findings (tiny tables are fine)
WARMUP_SECONDS = 1.0
OCSP_REQUEST_TIMEOUT_SECONDS = 5.0
# A fresh stack is slower for its first seconds (connection pools, caches, the buffer pool): load it this long
# before the empty-database figures, as the loaded ones come after minutes of running.
SETTLE_SECONDS = 5.0
CONCURRENCY = 16
# OCSP with a nonce asks about this many certificates drawn at random from the database (all of them when there are
# fewer): spread over the whole `certificates` table, so a million rows cannot hide in the buffer pool.
NONCE_SERIALS = 16384
SERVICE_USERS = ("hapki_clm", "hapki_cara")
HOT_PATH_ISSUANCES = 5  # and one repeat of the first request
CAPTURE_SECONDS = 6.0  # longer than the outbox sweep's period (5 s) and the sealer's

# Per table, how a clone of the template row gets its own identity; `s` is the clone's number (1..N).
# Every other column is copied from the template row as it is (sizes and shapes stay real).


def _key(tag: str, first: str = "", salt: str = "") -> str:
    """32 hex digits: 8 that grow with s, spread evenly over the key space (SCALE = 2^32 / N), then MD5 digits.

    Clones in the order of s append to the primary key (a random-order load of a million rows through a small
    buffer pool takes an hour), while the keys still cover the whole space as random ids do, so what the benchmark
    inserts afterwards lands among them as it would among real rows.
    """
    return (f"CONCAT('{first}', LOWER(LPAD(HEX(FLOOR((s - 1) * SCALE)), 8, '0')), "
            f"LEFT(MD5(CONCAT('growth-{tag}', {salt}s)), {24 - len(first)}))")


_REQUEST_ID = _key("r")
_SERIAL = _key("s", first="7")
_NOT_AFTER = "NOW(6) + INTERVAL 31 DAY + INTERVAL (s MOD (59 * 86400)) SECOND"
_CREATED = "NOW(6) - INTERVAL (s MOD (90 * 86400)) SECOND"
OVERRIDES: dict[str, dict[str, str]] = {
    "requests": {"id": _REQUEST_ID, "idempotency_key": "CONCAT('growth-', s)", "serial": _SERIAL,
                 "csr_sha256": "SHA2(CONCAT('growth-csr', s), 256)", "created_at": _CREATED, "updated_at": _CREATED,
                 "not_after": _NOT_AFTER, "requester": "CONCAT('growth-', s MOD 1000)",
                 # the next expiry window (30 days before not_after) is in the future: the scheduler leaves them be
                 "expiry_check_at": f"({_NOT_AFTER}) - INTERVAL 30 DAY"},
    "request_names": {"request_id": _REQUEST_ID, "value": "CONCAT('growth-', s, '.example.com')"},
    "signing_intents": {"id": _key("i"), "request_id": _REQUEST_ID, "serial": _SERIAL,
                        "created_at": _CREATED, "resolved_at": _CREATED},
    "certificates": {"serial": _SERIAL, "request_id": _REQUEST_ID, "intent_id": _key("i"),
                     "created_at": _CREATED, "not_before": _CREATED, "not_after": _NOT_AFTER},
    "audit_entries": {"id": _key("a", salt="t.id, "), "request_id": _REQUEST_ID, "serial": _SERIAL,
                      "created_at": _CREATED},
}
# Which template rows each table clones: those of the template request.
TEMPLATE_ROWS = {
    "requests": "t.id = '{rid}'", "request_names": "t.request_id = '{rid}'",
    "signing_intents": "t.request_id = '{rid}' AND t.state = 'issued'", "certificates": "t.request_id = '{rid}'",
    "audit_entries": "t.request_id = '{rid}'",
}


def staging_statements(table: str, request_id: str) -> str:
    """Copy the template rows of `table` into `growth_<table>` (an INSERT ... SELECT from the table it inserts into
    would go through a temporary table on every chunk)."""
    where = TEMPLATE_ROWS[table].format(rid=request_id)
    return (f"DROP TABLE IF EXISTS `growth_{table}`; CREATE TABLE `growth_{table}` LIKE `{table}`; "
            f"INSERT INTO `growth_{table}` SELECT * FROM `{table}` t WHERE {where}")


def clone_statement(table: str, columns: list[str], first: int, last: int, count: int) -> str:
    """INSERT ... SELECT cloning the staged template rows of `table` once per s in first..last of `count` (MariaDB's
    seq engine): the template rows are the outer table, so the rows come in the order of s (no ORDER BY: a sort
    of the chunk through a temporary table)."""
    overrides = OVERRIDES[table]
    scale = repr(2**32 / count)
    exprs = [overrides.get(c, f"t.`{c}`").replace("SCALE", scale) for c in columns]
    return (f"INSERT INTO `{table}` ({', '.join(f'`{c}`' for c in columns)}) "
            f"SELECT {', '.join(exprs)} FROM `growth_{table}` t, (SELECT seq AS s FROM seq_{first}_to_{last}) g")


def secondary_indexes(sql: Any, table: str) -> dict[str, str]:
    """`table`'s secondary indexes: name -> the ALTER TABLE clause that re-creates it (`ADD [UNIQUE] INDEX ...`)."""
    out = sql("SELECT index_name, non_unique, column_name, IFNULL(sub_part, '') FROM information_schema.statistics "
              f"WHERE table_schema = DATABASE() AND table_name = '{table}' AND index_name <> 'PRIMARY' "
              "ORDER BY index_name, seq_in_index")
    indexes: dict[str, tuple[bool, list[str]]] = {}
    for line in out.splitlines():
        name, non_unique, column, sub_part = line.split("\t")
        unique, columns = indexes.setdefault(name, (non_unique == "0", []))
        columns.append(f"`{column}`" + (f"({sub_part})" if sub_part else ""))
    return {name: f"ADD {'UNIQUE ' if unique else ''}INDEX `{name}` ({', '.join(columns)})"
            for name, (unique, columns) in indexes.items()}


def preload(sql: Any, count: int, say: Any) -> dict[str, Any]:
    """Clone the newest issued request's rows `count` times; `sql` runs a statement in the hapki database as root.

    A bulk load: each table's secondary indexes are dropped, the rows inserted in primary-key chunks, and the
    indexes built again (sorted builds; inserting a million random keys into each index one by one through a small
    buffer pool takes an hour). The unique indexes are re-created as such, so a clone that broke one would fail.
    """
    request_id = sql("SELECT r.id FROM requests r JOIN certificates c ON c.request_id = r.id "
                     "ORDER BY r.created_at DESC LIMIT 1").strip()
    if not request_id:
        raise RuntimeError("no issued certificate to clone: issue one first")
    rows: dict[str, int] = {}
    began = time.monotonic()
    for table in OVERRIDES:
        columns = sql(f"SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE() "
                      f"AND table_name = '{table}' ORDER BY ordinal_position").split()
        sql(staging_statements(table, request_id))
        indexes = secondary_indexes(sql, table)
        if indexes:
            sql(f"ALTER TABLE `{table}` " + ", ".join(f"DROP INDEX `{name}`" for name in indexes))
        try:
            for first in range(1, count + 1, CHUNK):
                last = min(count, first + CHUNK - 1)
                sql(clone_statement(table, columns, first, last, count))
                say(f"    preload {table}: {last}/{count} ({time.monotonic() - began:.0f} s)")
        finally:
            if indexes:
                sql(f"ALTER TABLE `{table}` " + ", ".join(indexes.values()))
                say(f"    preload {table}: {len(indexes)} indexes built ({time.monotonic() - began:.0f} s)")
        sql(f"DROP TABLE `growth_{table}`")
        rows[table] = int(sql(f"SELECT COUNT(*) FROM `{table}`").strip())
    sql("ANALYZE TABLE " + ", ".join(f"`{t}`" for t in OVERRIDES))
    return {"rows": rows, "seconds": round(time.monotonic() - began, 1), "template_request": request_id}


# --- EXPLAIN of what the services actually ran ------------------------------------------------------------------------

_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\b\d+(?:\.\d+)?\b")


def normalise(statement: str) -> str:
    """A statement with its literals replaced by `?` and whitespace folded: one entry per query shape."""
    return " ".join(_LITERAL.sub("?", statement).split())


def explainable(statement: str) -> bool:
    """SELECT, UPDATE, DELETE (and INSERT ... SELECT): statements with an access path to check."""
    head = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
    return head in ("SELECT", "UPDATE", "DELETE") or (head == "INSERT" and " SELECT " in statement.upper())


def scans(explain_rows: list[dict[str, str]], limit: int = SCAN_ROWS_LIMIT) -> list[str]:
    """The full scans in EXPLAIN output (type ALL, or a full index scan) estimated above `limit` rows."""
    found = []
    for row in explain_rows:
        # An estimate, or with a rowid filter the estimate and the share the filter keeps: "1 (0%)".
        text = row.get("rows") or "NULL"
        rows = int(text.split()[0]) if text != "NULL" else 0
        if row.get("type") in ("ALL", "index") and rows > limit:
            found.append(f"{row.get('table')}: {row.get('type')} over ~{rows} rows")
    return found


def parse_explain(output: str) -> list[dict[str, str]]:
    """`mariadb --batch` EXPLAIN output (with its header line) as dicts."""
    lines = [line.split("\t") for line in output.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    return [dict(zip(header, values)) for values in lines[1:]]


def capture_begin(root_sql: Any) -> None:
    root_sql("SET GLOBAL log_output = 'TABLE'; TRUNCATE TABLE mysql.general_log; SET GLOBAL general_log = 1;")


def capture_end(root_sql: Any) -> tuple[list[str], dict[str, int]]:
    """Distinct explainable statements the service users ran since capture_begin (one example per shape), and how
    many statements each service user sent in all."""
    root_sql("SET GLOBAL general_log = 0;")
    users = " OR ".join(f"user_host LIKE '{u}[%'" for u in SERVICE_USERS)
    out = root_sql("SELECT SUBSTRING_INDEX(user_host, '[', 1), "
                   "REPLACE(REPLACE(CONVERT(argument USING utf8mb4), '\\n', ' '), '\\t', ' ') "
                   f"FROM mysql.general_log WHERE command_type IN ('Query', 'Execute') AND ({users})")
    shapes: dict[str, str] = {}
    counts = dict.fromkeys(SERVICE_USERS, 0)
    for line in out.splitlines():
        user, _, text = line.partition("\t")
        for statement in split_statements(text):
            counts[user] = counts.get(user, 0) + 1
            if explainable(statement):
                shapes.setdefault(normalise(statement), statement)
    return list(shapes.values()), counts


def explain_all(root_sql: Any, statements: list[str]) -> list[dict[str, Any]]:
    """EXPLAIN each statement in the hapki database; its access path rows and any full scans."""
    report = []
    for statement in statements:
        try:
            rows = parse_explain(root_sql(f"USE hapki; EXPLAIN {statement}", header=True))
        except RuntimeError as exc:
            report.append({"statement": normalise(statement), "error": str(exc)[:300], "scans": []})
            continue
        report.append({"statement": normalise(statement), "plan": [
            {k: r.get(k) for k in ("table", "type", "key", "rows")} for r in rows], "scans": scans(rows)})
    return report


# --- the run ----------------------------------------------------------------------------------------------------------

async def _measure(stack: Any, pool: list[Any], seconds: float, ocsp_url: str, ocsp_body: bytes,
                   nonce_bodies: list[bytes]) -> dict[str, Any]:
    from hapki.cli.bench import _run_level

    # CPU of the services per issuance / per response: unlike the rates, other load on the host does not move it.
    services = {"clm": stack.clm.pid, "cara": stack.cara.pid, "mariadbd": stack.env.db.pid,
                "nats-server": stack.env.nats.pid}
    level = await _run_level(stack.env.nats.nats_config("client"), CONCURRENCY, seconds, WARMUP_SECONDS, pool,
                             services)
    ordered = sorted(level.latencies_ms)
    figures = {"issuance": {"rate_per_s": round(len(ordered) / seconds, 1), "p50_ms": percentile(ordered, 50),
                            "p99_ms": percentile(ordered, 99), "errors": level.errors,
                            "cpu_ms": _total_ms(level.cpu_seconds, len(ordered)),
                            "cpu_ms_by_process": per_issuance_ms(level.cpu_seconds, len(ordered))}}
    for what, bodies in (("ocsp", [ocsp_body]), ("ocsp_nonce", nonce_bodies)):
        groups = ProcessGroups({name: [pid] for name, pid in services.items()})
        groups.start()
        load = await _ocsp_load(ocsp_url, bodies, CONCURRENCY, seconds + WARMUP_SECONDS, 0.0)
        cpu = groups.stop()
        answered = round(load["responses_per_second"] * (seconds + WARMUP_SECONDS))
        figures[what] = {"rate_per_s": load["responses_per_second"], "p50_ms": load["p50_ms"],
                         "p99_ms": load["p99_ms"], "errors": load["errors"], "cpu_ms": _total_ms(cpu, answered),
                         "cpu_ms_by_process": per_issuance_ms(cpu, answered)}
    return figures


def nonce_requests(template: bytes, serials: list[str]) -> list[bytes]:
    """OCSP requests (DER) about each hex serial, for the issuer `template` (an OCSP request) names, each with its
    own nonce."""
    question = ocsp.load_der_ocsp_request(template)
    bodies = []
    for serial in serials:
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            question.issuer_name_hash, question.issuer_key_hash, int(serial, 16), question.hash_algorithm)
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        bodies.append(builder.build().public_bytes(serialization.Encoding.DER))
    return bodies


def stored_serials(root_sql: Any, count: int, *, at_random: bool) -> list[str]:
    """Up to `count` serials of stored certificates: drawn at random from the whole table (a scan: set-up only), or
    the first ones the primary key holds (enough for settling)."""
    order = " ORDER BY RAND()" if at_random else ""
    out = root_sql(f"USE hapki; SELECT serial FROM certificates{order} LIMIT {int(count)}")
    return [line.strip() for line in out.splitlines() if line.strip()]


async def _ocsp_load(url: str, bodies: list[bytes], concurrency: int, seconds: float,
                     warmup: float) -> dict[str, Any]:
    """`concurrency` closed-loop clients POSTing `bodies` in turn to `url` (plain HTTP, aiohttp); every answer must
    be good."""
    latencies: list[float] = []
    errors: list[str] = []
    headers = {"Content-Type": "application/ocsp-request"}
    began = time.monotonic()
    window = (began + warmup, began + warmup + seconds)
    turns = itertools.cycle(bodies)  # shared by the clients: one event loop, no lock needed

    async def loop(http: aiohttp.ClientSession) -> None:
        while (start := time.monotonic()) < window[1]:
            try:
                async with http.post(url, data=next(turns), headers=headers) as response:
                    answer = ocsp.load_der_ocsp_response(await response.read())
                ok = (answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
                      and answer.certificate_status is ocsp.OCSPCertStatus.GOOD)
                problem = None if ok else f"{answer.response_status.name}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"[:200]
            if start >= window[0]:
                if problem is None:
                    latencies.append((time.monotonic() - start) * 1000)
                else:
                    errors.append(problem)

    timeout = aiohttp.ClientTimeout(total=OCSP_REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        await asyncio.gather(*(loop(http) for _ in range(concurrency)))
    ordered = sorted(latencies)
    return {"responses_per_second": round(len(ordered) / seconds, 1), "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99), "errors": len(errors)}


def _total_ms(cpu: dict[str, float], count: int) -> float | None:
    """CPU milliseconds of all the services per operation."""
    return round(1000 * sum(cpu.values()) / count, 3) if count else None


async def _hot_path(stack: Any, pool: list[Any], ocsp_url: str, ocsp_body: bytes) -> None:
    """A few issuances (with idempotency keys, one repeated) and OCSP requests, one at a time, over at least
    CAPTURE_SECONDS so that the periodic work (outbox sweep, audit sealer) shows in the general log too."""
    import aiohttp

    from hapki.cli.client import ClmClient

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    began = time.monotonic()
    client = await ClmClient.connect(stack.env.nats.nats_config("client"), timeout=15.0)
    # OCSP about the certificates just issued: CARA has no answer for them yet, so each is a status read and a
    # signature (what its cache then keeps); the measured certificate's answer comes from the cache.
    bodies = [ocsp_body]
    try:
        for i, request in enumerate(pool[:HOT_PATH_ISSUANCES]):
            keyed = request.model_copy(update={"idempotency_key": f"growth-hot-{i}-{time.time_ns()}"})
            reply = await client.issue(keyed)
            if i == 0:
                await client.issue(keyed)  # a repeat: the idempotency lookup
            if reply.certificate_pem and reply.chain_pem:
                cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
                issuer = x509.load_pem_x509_certificates(reply.chain_pem.encode())[0]
                bodies.append(ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
                              .public_bytes(serialization.Encoding.DER))
    finally:
        await client.close()
    async with aiohttp.ClientSession() as http:
        for body in bodies:
            async with http.post(ocsp_url, data=body, headers={"Content-Type": "application/ocsp-request"}) as r:
                await r.read()
    await asyncio.sleep(max(0.0, CAPTURE_SECONDS - (time.monotonic() - began)))


def change(before: float | None, after: float | None) -> float | None:
    """Relative change in percent (None when either side is missing or zero)."""
    return None if not before or after is None else round(100 * (after - before) / before, 1)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt2(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# The figures of a phase and their names in the table.
FIGURES = {"issuance": "issuance", "ocsp": "ocsp", "ocsp_nonce": "ocsp nonce"}


def table(report: dict[str, Any]) -> str:
    e, l = report["empty"], report["loaded"]
    lines = [f"hapki bench --growth {report['count']}: local stack, {CONCURRENCY} closed-loop clients, "
             f"{report['seconds']:g} s per figure; preload {report['preload']['seconds']:.0f} s "
             f"({', '.join(f'{t} {n}' for t, n in report['preload']['rows'].items())})", "",
             f"{'figure':<22} {'empty':>9} {'loaded':>9} {'change':>8}"]
    figures = [what for what in FIGURES if what in e and what in l]  # a report from before ocsp_nonce has two
    for what in figures:
        for key, label in (("rate_per_s", "/s"), ("p50_ms", " p50 ms"), ("p99_ms", " p99 ms"), ("errors", " errors"),
                           ("cpu_ms", " CPU ms each")):
            a, b = e[what].get(key), l[what].get(key)
            delta = change(a, b)
            lines.append(f"{FIGURES[what] + label:<22} {_fmt(a):>9} {_fmt(b):>9} "
                         f"{(f'{delta:+.1f}%' if delta is not None else '-'):>8}")
    for what in figures:
        lines.append(f"{FIGURES[what]} CPU ms each by process, empty -> loaded: " + ", ".join(
            f"{k} {_fmt2(v)} -> {_fmt2(l[what]['cpu_ms_by_process'].get(k))}"
            for k, v in e[what]["cpu_ms_by_process"].items()))
    sent = report["statements_sent"]
    lines += ["", f"Statements sent during {report['issuances_captured']} issuances (and a repeat), 5 OCSP requests and "
              f"{CAPTURE_SECONDS:g} s of background work: " + ", ".join(f"{u} {n}" for u, n in sent.items())]
    lines += ["", f"Hot-path statements (EXPLAIN with {report['count']} certificates): "
              f"{len(report['explain'])} shapes, {sum(bool(x['scans']) for x in report['explain'])} with a full scan"]
    for item in report["explain"]:
        mark = "SCAN " if item["scans"] else "ERR  " if "error" in item else "ok   "
        plan = "; ".join(f"{p['table']}:{p['type']}/{p['key']}" for p in item.get("plan", [])) or item.get("error")
        lines.append(f"  {mark}{item['statement'][:110]}")
        lines.append(f"        {plan}" + (f"  <- {', '.join(item['scans'])}" if item["scans"] else ""))
    return "\n".join(lines)


def run(base_dir: Path, count: int, *, seconds: float, as_json: bool) -> int:
    from hapki.cli.bench import _csr_pool
    from hapki.cli.bench_revocation import _ocsp_requests
    from hapki.cli.demo import start_stack
    from hapki.lab.local import free_port

    say = (lambda text: print(text, file=sys.stderr, flush=True))
    base = Path(base_dir).resolve() / "growth"
    shutil.rmtree(base, ignore_errors=True)  # an empty database to start from
    listen = f"127.0.0.1:{free_port()}"
    say(f"hapki bench --growth {count}: fresh local stack in {base} (CARA OCSP on http://{listen}) ...")
    stack = start_stack(base, None, cara_overrides={"http_listen": listen, "public_url": f"http://{listen}"})
    try:
        pool = _csr_pool(64)
        nats = stack.env.nats.nats_config("client")
        # POSTs answered from CARA's memory cache after the first (hapki.cara.ocsp_cache): per response, the HTTP
        # edge and the cache; the database is read by the cache's revocation poll, once a second.
        url, body = f"http://{listen}/ocsp", asyncio.run(_ocsp_requests(nats, 1))[0][1]
        root_sql = _root_sql(stack.env.db)

        def settled_figures(database: str) -> dict[str, Any]:
            """Settle the services (not measured), then issuance, OCSP and OCSP with a nonce on `database`. The
            nonce requests' serials are drawn after the settling, which issues certificates too."""
            say(f"  settling: {SETTLE_SECONDS:g} s of issuance and OCSP, not measured ...")
            asyncio.run(_measure(stack, pool, SETTLE_SECONDS, url, body,
                                 nonce_requests(body, stored_serials(root_sql, 64, at_random=False))))
            say(f"  {database}: issuance, OCSP and OCSP with a nonce, {seconds:g} s each ...")
            nonce_bodies = nonce_requests(body, stored_serials(root_sql, NONCE_SERIALS, at_random=True))
            return asyncio.run(_measure(stack, pool, seconds, url, body, nonce_bodies))

        empty = settled_figures("empty database")
        say(f"  preloading {count} certificates (CLM and CARA stopped meanwhile: their background queries would "
            "scan the tables while the indexes are being re-built) ...")
        for service in (stack.clm, stack.cara):
            service.stop()
        loaded_rows = preload(lambda q: root_sql(f"USE hapki; {q}"), count, say)
        stack.cara.start()
        stack.clm.start()
        loaded = settled_figures(f"{count} certificates")  # the restarted services settle too: both phases warm
        say("  EXPLAIN of the hot-path statements ...")
        capture_begin(root_sql)
        asyncio.run(_hot_path(stack, pool, url, body))
        statements, sent = capture_end(root_sql)
        explain = explain_all(root_sql, statements)
    finally:
        stack.stop()
    report = {"count": count, "seconds": seconds, "empty": empty, "loaded": loaded, "preload": loaded_rows,
              "explain": explain, "statements_sent": sent, "issuances_captured": HOT_PATH_ISSUANCES}
    (base / "growth.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if as_json else table(report))
    failed = any(x["scans"] or "error" in x for x in explain) or empty["issuance"]["errors"] \
        or loaded["issuance"]["errors"] or any(phase[what]["errors"] for phase in (empty, loaded)
                                               for what in ("ocsp", "ocsp_nonce"))
    return 1 if failed else 0


def _root_sql(db: Any) -> Any:
    """Run SQL as root over the socket; `header=True` keeps the column names line (for EXPLAIN)."""
    import subprocess

    def run_sql(statement: str, header: bool = False, timeout: float = PRELOAD_TIMEOUT_SECONDS) -> str:
        argv = ["mariadb", "--no-defaults", f"--socket={db.socket}", "--user=root", "--batch", "--raw"]
        if not header:
            argv.append("--skip-column-names")
        result = subprocess.run(argv, input=statement, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"mariadb client failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    return run_sql
