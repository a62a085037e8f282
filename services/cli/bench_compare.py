"""`hapki bench --compare`: hapki side by side with the hardware limit and a peer CA, in one run, under one load.

Step 1: one pool of P-256 CSRs (a JSON file the k6 scripts load) serves every column.
Step 2: (a) raw limit: in this process, parse + verify the CSR, build the certificate with CARA's own builder and
        sign it in SoftHSM through the project's HSM adapter; no bus, no database, one core.
Step 3: (b) CFSSL (Debian `golang-cfssl`): `cfssl serve` with an EC P-256 CA and its MariaDB certificate store
        (`-db-config`; a private mariadbd configured like hapki's), loaded by k6/issue.js on /api/v1/cfssl/sign.
Step 4: (c) hapki single node: the local stack of `hapki bench` (one NATS, one MariaDB, SoftHSM, one CARA, one
        CLM), loaded by the same script on CLM's REST API (plain HTTP on loopback: no haproxy in this topology).
        Traced as in production: OTEL_TRACES_SAMPLER(_ARG) when set, else hapki.runtime.telemetry.PRODUCTION_SAMPLER
        (the report names it).
Step 5: (d) the HA lab through the CLM VIP over HTTPS (haproxy, Galera, the R3 bus, fencing), only when asked
        (`--with-lab`) and the lab is up; otherwise the column says why it was skipped.
Each k6 column: a warm-up run, then MODE=rate (a fixed arrival rate; several rates, `--rate 50,100,300`, one run
each: the load curve) and MODE=max (closed loop, `vus` clients). Around each measured run: CPU seconds of every
service process (descendants included) and k6, and at the end their peak RSS (hapki.cli.procstat); for the lab,
also the Galera write-sets its nodes replicated per issuance (how many transactions a batch shared). After the
runs, certificates are read back from each store and verified under their CA: a column only counts if what it
answered is durable and valid.

Everything shares this machine's cores, the load generator included; columns run one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pymysql
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hapki.cara.config import SIGNER_PROCESSES_ENV
from hapki.cli import k6
from hapki.cli.bench import percentile
from hapki.cli.procstat import ProcessGroups, machine_busy_seconds, per_issuance_ms
from hapki.runtime.telemetry import PRODUCTION_SAMPLER, SAMPLER_ENV, SamplerSetting

if TYPE_CHECKING:
    from hapki.lab.ha import Lab

REQUESTER = "k6-compare"
CSR_POOL = 512
VERIFY_SAMPLE = 50
COLUMNS = {"raw": "(a) raw limit", "cfssl": "(b) CFSSL + MariaDB", "single": "(c) hapki single node",
           "lab": "(d) hapki HA lab"}
Say = Callable[[str], None]


@dataclass(frozen=True)
class LoadShape:
    """The same load for every k6 column."""

    rate: int  # MODE=rate: arrivals per second
    vus: int  # MODE=max: closed-loop clients
    seconds: float  # measured, per run
    warmup: float  # one warm-up run per column, not measured
    more_rates: tuple[int, ...] = ()  # further fixed-rate runs after `rate`, in order: the load curve

    @property
    def rates(self) -> tuple[int, ...]:
        return (self.rate, *self.more_rates)

    def modes(self) -> list[str]:
        """The measured runs in order: "rate" (or "rate@R" for each of several rates), then "max"."""
        rates = [f"rate@{r}" for r in self.rates] if self.more_rates else ["rate"]
        return [*rates, "max"]

    def offered(self, mode: str) -> int | None:
        """The arrival rate of a rate run (None for max)."""
        if mode == "max":
            return None
        return self.rate if mode == "rate" else int(mode.removeprefix("rate@"))

    def env(self, mode: str) -> dict[str, str]:
        offered = self.offered(mode)
        return {"MODE": "max" if offered is None else "rate", "RATE": str(offered or self.rate), "VUS": str(self.vus),
                "SECONDS": f"{self.seconds:g}", "WARMUP": "0"}


# --- (a) the raw limit ---------------------------------------------------------------------------------------------

def raw_limit(base: Path, csrs: list[str], seconds: float) -> dict[str, Any]:
    """Certificates per second built and HSM-signed in this process: CSR parse + verify, build, sign, PEM."""
    from hapki.cara.issuance import build_certificate, parse_csr, random_serial
    from hapki.contracts.models import SignCertificate
    from hapki.lab.local import SoftHSM
    from hapki.runtime.hsm import HSMMemberConfig, HSMPool

    hsm = SoftHSM(base, "raw-hsm")
    hsm.start()
    try:
        hsm.init_token("raw")
        module = hsm.conf_path.parent / "libsofthsm2-raw.so"  # a private copy: SOFTHSM2_CONF is read once per library
        shutil.copyfile(hsm.module_path, module)
        member = HSMMemberConfig(name="raw", module_path=str(module), token_label="raw", pin_file=hsm.pin_file("raw"),
                                 softhsm_conf=hsm.conf_path)
        key_id = secrets.token_bytes(8)
        with HSMPool([member], rw=True) as pool:
            pool.generate_ec_key("raw-ca", key_id, ec.SECP256R1())
            key = pool.private_key(key_id)
            ca_cert = _self_signed_ca(key, "hapki raw-limit CA")
            requests = [SignCertificate(request_id=secrets.token_hex(16), profile="tls-server", csr_pem=pem,
                                        common_name=f"k6-{i}.example.com", dns_names=[f"k6-{i}.example.com"],
                                        validity_seconds=90 * 86400, key_usage=["digital_signature"],
                                        extended_key_usage=["server_auth"])
                        for i, pem in enumerate(csrs)]
            latencies: list[float] = []
            cpu_before = time.process_time()
            began = time.perf_counter()
            last: x509.Certificate | None = None
            while (start := time.perf_counter()) - began < seconds:
                request = requests[len(latencies) % len(requests)]
                last = build_certificate(request, parse_csr(request), issuer_cert=ca_cert, issuer_key=key,
                                         serial=random_serial(), now=datetime.now(UTC), backdate=timedelta(0))
                last.public_bytes(serialization.Encoding.PEM)
                latencies.append((time.perf_counter() - start) * 1000)
            elapsed = time.perf_counter() - began
            cpu = time.process_time() - cpu_before
    finally:
        hsm.stop()
    assert last is not None
    last.verify_directly_issued_by(ca_cert)
    ordered = sorted(latencies)
    issued = len(ordered)
    return {
        "runs": {"max": {"offered_per_s": None,  # closed loop: as fast as one process goes
                         "issued": issued, "seconds": round(elapsed, 2), "rate_per_s": round(issued / elapsed, 1),
                         "p50_ms": percentile(ordered, 50), "p95_ms": percentile(ordered, 95),
                         "p99_ms": percentile(ordered, 99), "errors": 0,
                         "cpu_ms_per_issuance": per_issuance_ms({"bench (one process)": cpu}, issued),
                         "ceiling_per_s": ceiling({"bench (one process)": cpu}, issued)}},
        "rss_peak_mib": {"bench (one process)": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "verified": {"stored": None, "checked": 1, "failed": 0},
        "note": "one process, one core: CSR parse + verify, CARA's build_certificate, SoftHSM ECDSA P-256, PEM",
    }


def _self_signed_ca(key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


# --- k6 columns ------------------------------------------------------------------------------------------------------

def _k6_column(name: str, target: str, base_url: str, groups: ProcessGroups, shape: LoadShape, csr_file: Path,
               workdir: Path, say: Say, ca_bundle: Path | None = None,
               counters: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
    """A warm-up run, then one measured k6 run per mode, with CPU per process around each (and `counters`, read
    before and after each run, per issuance)."""
    env = {"TARGET": target, "BASE_URL": base_url, "CSR_FILE": str(csr_file), "REQUESTER": REQUESTER}
    log = workdir / f"k6-{name}.log"
    # k6's idempotency keys are RUN_ID, VU and iteration: new ones every call, warm-up included. The lab is not reset
    # between runs, and a warm-up that replayed the last run's keys got nothing but 409s (a different CSR under a used
    # key): it warmed the refusal path, not issuance (docs/PERFORMANCE-HISTORY.md, Session 9).
    run_id = f"{name}-{secrets.token_hex(4)}"
    say(f"  {COLUMNS[name]}: warm-up {shape.warmup:g} s ...")
    warm = k6.run("issue.js", {**env, **shape.env("max"), "SECONDS": f"{shape.warmup:g}", "RUN_ID": f"{run_id}-warmup"},
                  workdir / f"k6-{name}-warmup.json", seconds=shape.warmup, log_file=log, ca_bundle=ca_bundle)
    say(f"    warm-up: {warm.issued} issued, {warm.errors} errors")
    runs: dict[str, Any] = {}
    for mode in shape.modes():
        say(f"  {COLUMNS[name]}: {mode} ({_mode_text(mode, shape)}), {shape.seconds:g} s ...")
        counted = counters() if counters else {}
        groups.start()
        machine = machine_busy_seconds()
        k6_cpu = _children_cpu()
        began = time.monotonic()
        tag = mode.replace("@", "")  # RUN_ID goes into idempotency keys: letters, digits, '.', '_', ':', '-'
        summary = k6.run("issue.js", {**env, **shape.env(mode), "RUN_ID": f"{run_id}-{tag}"},
                         workdir / f"k6-{name}-{tag}.json", seconds=shape.seconds, log_file=log, ca_bundle=ca_bundle)
        wall = time.monotonic() - began
        cpu = {**groups.stop(), "k6": round(_children_cpu() - k6_cpu, 3)}
        runs[mode] = {"offered_per_s": shape.offered(mode), "issued": summary.issued, "seconds": summary.seconds,
                      "rate_per_s": round(summary.rate_per_s, 1),
                      "p50_ms": summary.p50_ms, "p95_ms": summary.p95_ms, "p99_ms": summary.p99_ms,
                      "errors": summary.errors, "cpu_seconds": cpu,
                      "cpu_ms_per_issuance": per_issuance_ms(cpu, summary.issued),
                      "ceiling_per_s": ceiling(cpu, summary.issued),
                      "machine_cpu_percent": round(100 * (machine_busy_seconds() - machine) / wall)}
        if counters:
            runs[mode]["per_issuance"] = per_issuance(counted, counters(), summary.issued)
        say(f"    {summary.rate_per_s:.1f} issued/s, p99 {summary.p99_ms or 0:.1f} ms, {summary.errors} errors")
    return {"warmup": {"issued": warm.issued, "errors": warm.errors}, "runs": runs,
            "rss_peak_mib": groups.peak_rss_mib()}


def ceiling(cpu: dict[str, float], issued: int, cores: int | None = None) -> float | None:
    """Issuances/s this machine's cores would allow if the measured processes (load generator included) had them
    all: cores / CPU seconds per issuance. A figure other load on a shared machine does not move, unlike the rate."""
    total = sum(cpu.values())
    return round((cores or os.cpu_count() or 1) * issued / total, 1) if issued and total > 0 else None


def per_issuance(before: Mapping[str, int], after: Mapping[str, int], issued: int) -> dict[str, float | None]:
    """How much each counter rose per issuance over a run (None when nothing was issued or a read failed)."""
    return {key: (round((after[key] - before[key]) / issued, 3) if issued and key in after else None)
            for key in before}


def _mode_text(mode: str, shape: LoadShape) -> str:
    offered = shape.offered(mode)
    return f"{shape.vus} closed-loop clients" if offered is None else f"{offered}/s arrivals"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children: the k6 runs
    return usage.ru_utime + usage.ru_stime


# --- (b) CFSSL ---------------------------------------------------------------------------------------------------------

CFSSL_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
  serial_number            varbinary(128) NOT NULL,
  authority_key_identifier varbinary(128) NOT NULL,
  ca_label                 varbinary(128),
  status                   varbinary(128) NOT NULL,
  reason                   int,
  expiry                   timestamp DEFAULT '0000-00-00 00:00:00',
  revoked_at               timestamp DEFAULT '0000-00-00 00:00:00',
  pem                      varbinary(4096) NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE IF NOT EXISTS ocsp_responses (
  serial_number            varbinary(128) NOT NULL,
  authority_key_identifier varbinary(128) NOT NULL,
  body                     varbinary(4096) NOT NULL,
  expiry                   timestamp DEFAULT '0000-00-00 00:00:00',
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier) REFERENCES certificates(serial_number, authority_key_identifier)
);
"""  # CFSSL's certdb/mysql migration 001 (the schema of the 1.2 release Debian ships)


@contextlib.contextmanager
def cfssl_server(base: Path, say: Say) -> Iterator[tuple[str, Path, int, Any]]:
    """`cfssl serve` with a fresh P-256 CA and a MariaDB store: (URL, CA file, cfssl PID, the MariaDB)."""
    from hapki.lab.local import MariaDB, TlsFiles, _stop_child, free_port

    binary = shutil.which("cfssl")
    if binary is None:
        raise RuntimeError("cfssl not found: apt-get install golang-cfssl (scripts/setup.sh installs it)")
    base.mkdir(parents=True, exist_ok=True)
    db = MariaDB(base, "cfssl-db")
    # Like hapki's: TLS on TCP; the same my.cnf (durability settings, buffer pool) as every hapki MariaDB.
    db.tls = TlsFiles.issue(base / "tls", "localhost", ["127.0.0.1"], ["localhost"])
    say("  (b) starting MariaDB and cfssl serve ...")
    db.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        password = secrets.token_urlsafe(18)
        # A fresh store per run, so the rows read back afterwards are this run's.
        db.sql("CREATE DATABASE IF NOT EXISTS cfssl; "
               f"CREATE USER IF NOT EXISTS 'cfssl'@'127.0.0.1' IDENTIFIED BY '{password}' REQUIRE SSL; "
               f"ALTER USER 'cfssl'@'127.0.0.1' IDENTIFIED BY '{password}' REQUIRE SSL; "
               "GRANT ALL ON cfssl.* TO 'cfssl'@'127.0.0.1'; USE cfssl; " + CFSSL_SCHEMA
               + "DELETE FROM ocsp_responses; DELETE FROM certificates;")
        key = ec.generate_private_key(ec.SECP256R1())
        ca_file, key_file = base / "ca.pem", base / "ca-key.pem"
        ca_file.write_bytes(_self_signed_ca(key, "CFSSL bench CA").public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
        config = base / "cfssl.json"
        config.write_text(json.dumps({"signing": {"default": {
            "expiry": "2160h", "usages": ["digital signature", "server auth"]}}}))
        db_config = base / "db.json"
        db_config.touch(mode=0o600)
        db_config.write_text(json.dumps({"driver": "mysql", "data_source":
                                         f"cfssl:{password}@tcp(127.0.0.1:{db.port})/cfssl?parseTime=true"
                                         "&tls=skip-verify"}))
        port = free_port()
        with (base / "cfssl.log").open("ab") as log:
            proc = subprocess.Popen([binary, "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", str(ca_file),
                                     "-ca-key", str(key_file), "-config", str(config), "-db-config", str(db_config),
                                     "-loglevel", "3"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _wait_port(port, proc, base / "cfssl.log")
        yield f"http://127.0.0.1:{port}", ca_file, proc.pid, db
    finally:
        if proc is not None:
            _stop_child(proc, 10)
        db.stop()


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cfssl serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"cfssl serve is not listening on {port} after {timeout:.0f} s")


def _verify_pems(pems: list[bytes | str], issuer: x509.Certificate) -> int:
    """How many of `pems` do NOT verify as directly issued by `issuer`."""
    failed = 0
    for pem in pems:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):  # wrong issuer name, key type or signature
            failed += 1
    return failed


def cfssl_column(base: Path, shape: LoadShape, csr_file: Path, say: Say) -> dict[str, Any]:
    with cfssl_server(base / "cfssl", say) as (url, ca_file, pid, db):
        groups = ProcessGroups({"cfssl": [pid], "mariadbd": [db.pid]})
        column = _k6_column("cfssl", "cfssl", url, groups, shape, csr_file, base, say)
        stored = int(db.sql("SELECT COUNT(*) FROM cfssl.certificates").strip())
        pems = [bytes.fromhex(h) for h in db.sql(
            f"SELECT HEX(pem) FROM cfssl.certificates LIMIT {VERIFY_SAMPLE}").split()]
        issuer = x509.load_pem_x509_certificate(ca_file.read_bytes())
    column["verified"] = {"stored": stored, "checked": len(pems), "failed": _verify_pems(pems, issuer)}
    return column


# --- (c) hapki single node, (d) the HA lab -------------------------------------------------------------------------------

async def _hapki_stored(connect_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Certificates the k6 runs got, read back from hapki's database and verified under the default issuer."""
    import aiomysql

    conn = await aiomysql.connect(**connect_kwargs, autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM certificates c JOIN requests r ON r.id = c.request_id"
                              " WHERE r.requester = %s", (REQUESTER,))
            (stored,) = await cur.fetchone()
            # No ORDER BY RAND(): it needs an internal temporary table, and a sample from the index order will do.
            await cur.execute("SELECT c.cert_pem FROM certificates c JOIN requests r ON r.id = c.request_id"
                              " WHERE r.requester = %s LIMIT %s", (REQUESTER, VERIFY_SAMPLE))
            pems = [row[0] for row in await cur.fetchall()]
            await cur.execute("SELECT cert_pem FROM issuers WHERE is_default = 1")
            (issuer_pem,) = await cur.fetchone()
    finally:
        conn.close()
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
    return {"stored": int(stored), "checked": len(pems), "failed": _verify_pems(pems, issuer)}


def tracing_sampler(env: Mapping[str, str] | None = None) -> tuple[SamplerSetting, str]:
    """The trace sampler the services of (c) run with and where it comes from: OTEL_TRACES_SAMPLER(_ARG) when set
    (ValueError if invalid), else what production runs (PRODUCTION_SAMPLER), not the always-on of the demos."""
    env = os.environ if env is None else env
    if env.get(SAMPLER_ENV, "").strip():
        return SamplerSetting.from_env(env), "OTEL_TRACES_SAMPLER"
    return PRODUCTION_SAMPLER, "production default"


def single_column(base: Path, shape: LoadShape, csr_file: Path, say: Say, sampler: SamplerSetting) -> dict[str, Any]:
    from hapki.cli.demo import reap_leftover_services, start_stack
    from hapki.lab.local import free_port

    listen = f"127.0.0.1:{free_port()}"
    say(f"  (c) starting a fresh local stack (NATS, MariaDB, SoftHSM, CARA, CLM on http://{listen}; trace sampler "
        f"{sampler.describe()}) ...")
    # A fresh stack per run, as (b) gets a fresh store: the indexes keyed by random serials outgrow the database's
    # buffer pool as the rows of earlier runs pile up, and every run then measured a slower database than the last.
    single = base / "single"
    reap_leftover_services(single, everything=True)
    shutil.rmtree(single, ignore_errors=True)
    stack = start_stack(single, None, clm_overrides={"http_listen": listen}, env_overrides=sampler.env())
    try:
        groups = ProcessGroups({"clm": [stack.clm.pid if stack.clm else None],
                                "cara": [stack.cara.pid if stack.cara else None],
                                "nats-server": [stack.env.nats.pid], "mariadbd": [stack.env.db.pid]})
        column = _k6_column("single", "hapki", f"http://{listen}", groups, shape, csr_file, base, say)
        column["verified"] = asyncio.run(_hapki_stored(stack.env.db.connect_kwargs()))
    finally:
        stack.stop()
    return column


def lab_sampler(pids: Sequence[int | None]) -> str:
    """The trace sampler the lab's services run with, from the environment of a running one (`hapki lab up` passes
    its own environment on: `OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01 hapki lab up`
    runs the lab as production samples; without them it traces everything, which its tests and `hapki trace` read).
    """
    for pid in pids:
        if pid is None:
            continue
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone in the meantime: the next one
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        try:
            return SamplerSetting.from_env(env).describe()
        except ValueError as exc:
            return f"unknown ({exc})"
    return "unknown (no running CLM process)"


LAB_KINDS = {"clm": "clm", "cara": "cara", "galera": "mariadbd", "nats": "nats-server", "haproxy": "haproxy",
             "watcher": "watcher", "keepalived": "keepalived"}


def galera_writesets(lab: Lab) -> dict[str, int]:
    """Write-sets the lab's Galera nodes replicated so far, all nodes summed (each write-set, one committed write
    transaction, is counted by the node it started on); {} when a node cannot be read (a fault test's leftovers)."""
    total = 0
    for node in lab.galera.nodes:
        try:
            conn = pymysql.connect(host=node.address, port=node.port, user="hapki",
                                   password=lab.galera.password("hapki"), ssl=lab.db_ssl_context(),
                                   connect_timeout=3, read_timeout=3)
        except (pymysql.err.MySQLError, OSError):
            return {}
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep_replicated'")
                row = cur.fetchone()
        except (pymysql.err.MySQLError, OSError):
            return {}
        finally:
            conn.close()
        total += int(row[1]) if row else 0
    return {"galera_writesets": total}


def lab_column(lab_dir: Path, shape: LoadShape, csr_file: Path, base: Path, say: Say) -> dict[str, Any]:
    from hapki.lab.ha import Lab

    lab = Lab(lab_dir)
    if lab.procs.meta.get("state") != "up" or not lab.reachable():
        return {"skipped": f"the HA lab in {lab.base_dir} is not up (`hapki lab up --dir {lab_dir}`)"}
    groups = ProcessGroups({label: [pid for name in lab.procs.names(kind=kind) for pid in lab.procs.pids(name)]
                            for kind, label in LAB_KINDS.items()})
    sampler = lab_sampler([pid for name in lab.procs.names(kind="clm") for pid in lab.procs.pids(name)])
    say(f"  (d) the HA lab's services trace with {sampler}")
    column = _k6_column("lab", "hapki", lab.url("clm"), groups, shape, csr_file, base, say, ca_bundle=lab.ca_bundle,
                        counters=lambda: galera_writesets(lab))
    column["sampler"] = sampler
    db = lab.galera.nodes[0]
    column["verified"] = asyncio.run(_hapki_stored({
        "host": db.address, "port": db.port, "user": "hapki", "db": "hapki", "password": lab.galera.password("hapki"),
        "ssl": lab.db_ssl_context()}))
    return column


# --- the report ---------------------------------------------------------------------------------------------------------

def ratios(columns: dict[str, Any], mode: str = "max", key: str = "rate_per_s") -> dict[str, float | None]:
    """Ratios of `key` (measured rate, or the CPU ceiling) in `mode`: hapki single / CFSSL and HA lab / CFSSL
    (None when a side is missing)."""
    def rate(name: str) -> float | None:
        run = (columns.get(name) or {}).get("runs", {}).get(mode)
        return run.get(key) if run else None

    cfssl = rate("cfssl")
    return {f"{name}/cfssl": (round(r / cfssl, 2) if r is not None and cfssl else None)
            for name in ("single", "lab") for r in [rate(name)]}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    shape = report["shape"]
    rates = [shape["rate"], *shape.get("more_rates", ())]
    lines = [f"hapki bench --compare: {report['cores']} cores shared by every process, the load generator included.",
             f"k6/issue.js per column: rate = {', '.join(f'{r}/s' for r in rates)} arrivals, max = {shape['vus']} "
             f"closed-loop clients; {shape['seconds']:g} s measured each, after a {shape['warmup']:g} s warm-up."]
    if processes := report.get("signer_processes"):
        lines.append(f"CARA signer processes of (c): {processes} (hapki bench --signer-processes N).")
    if tracing := report.get("tracing"):
        lab = report["columns"].get("lab") or {}
        lines.append(f"Trace sampler of (c): {tracing['sampler']} ({tracing['source']}; OTEL_TRACES_SAMPLER and "
                     f"_ARG choose another); of (d): {lab.get('sampler', '-')} (the environment of `hapki lab up`).")
    lines += ["", f"{'column':<24} {'mode':<8} {'issued/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
                  f"{'errors':>6} {'verified':>12} {'ceiling/s':>9} {'machine':>7}"]
    for name, title in COLUMNS.items():
        column = report["columns"].get(name)
        if column is None:
            continue
        if "skipped" in column or "failed" in column:
            lines.append(f"{title:<24} {'skipped' if 'skipped' in column else 'FAILED'}: "
                         f"{column.get('skipped') or column.get('failed')}")
            continue
        v = column["verified"]
        checked = f"{v['checked'] - v['failed']}/{v['checked']}" + (f" of {v['stored']}" if v["stored"] else "")
        for mode, run in column["runs"].items():
            machine = run.get("machine_cpu_percent")
            lines.append(f"{title:<24} {mode:<8} {run['rate_per_s']:>9.1f} {_fmt(run['p50_ms']):>7} "
                         f"{_fmt(run['p95_ms']):>7} {_fmt(run['p99_ms']):>7} {run['errors']:>6} {checked:>12} "
                         f"{_fmt(run.get('ceiling_per_s'), '.0f'):>9} {(f'{machine}%' if machine is not None else '-'):>7}")
            title = ""
    lines += ["", "ceiling/s: the rate the cores would allow if the measured processes had them all (cores / CPU s per "
              "issuance, k6 included); machine: CPU of the whole host during the run (200% = both cores busy).",
              "Ratios at max load, measured: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in report["ratios"].items())
              + "; by CPU ceiling: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in report["ceiling_ratios"].items())]
    lines += ["", "CPU ms per issuance by process (cpu: max load; cpu at N/s: a rate run, where every round trip and "
                  "batch is shared by fewer requests; k6 is the load generator), peak RSS MiB per process"]

    def cpu(run: dict[str, Any]) -> str:
        return "  ".join(f"{k} {_fmt(v, '.2f')}" for k, v in run["cpu_ms_per_issuance"].items())

    for name, title in COLUMNS.items():
        column = report["columns"].get(name)
        if not column or "runs" not in column:
            continue
        rss = "  ".join(f"{k} {_fmt(v, '.0f')}" for k, v in column["rss_peak_mib"].items())
        lines.append(f"{title:<24} cpu: {cpu(column['runs']['max'])}")
        for run in column["runs"].values():
            if (rate := run["offered_per_s"]) is not None:
                lines.append(f"{'':<24} cpu at {rate}/s: {cpu(run)}")
        writesets = [(run["offered_per_s"], run["per_issuance"].get("galera_writesets"))
                     for run in column["runs"].values() if run.get("per_issuance")]
        if writesets:
            lines.append(f"{'':<24} Galera write-sets per issuance: " + "  ".join(
                f"{f'{rate}/s' if rate is not None else 'max'} {_fmt(n, '.2f')}" for rate, n in writesets))
        lines.append(f"{'':<24} rss: {rss}")
    return "\n".join(lines)


def run_compare(base_dir: Path, shape: LoadShape, *, with_lab: bool, lab_dir: Path, as_json: bool,
                only: tuple[str, ...] = tuple(COLUMNS)) -> int:
    """Run the columns in `only`; print the table (or JSON); 0 when every run column issued with zero errors."""
    say: Say = (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        sampler, sampler_source = tracing_sampler()
    except ValueError as exc:
        print(f"hapki bench --compare: {exc}", file=sys.stderr)
        return 2
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    say(f"hapki bench --compare in {base}: a pool of {CSR_POOL} P-256 CSRs ...")
    csrs = k6.make_csrs(CSR_POOL)
    csr_file = base / "csrs.json"
    csr_file.write_text(json.dumps(csrs))
    columns: dict[str, Any] = {}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "raw": lambda: raw_limit(base / "raw", csrs, shape.seconds),
        "cfssl": lambda: cfssl_column(base, shape, csr_file, say),
        "single": lambda: single_column(base, shape, csr_file, say, sampler),
        "lab": lambda: lab_column(lab_dir, shape, csr_file, base, say) if with_lab else
        {"skipped": "not asked: pass --with-lab when the HA lab is up and yours (one lab per host)"},
    }
    for name in only:
        if name == "raw":
            say(f"  {COLUMNS['raw']}: {shape.seconds:g} s in this process ...")
        try:
            columns[name] = steps[name]()
        except (RuntimeError, OSError, k6.K6Error, subprocess.SubprocessError, pymysql.err.MySQLError) as exc:
            columns[name] = {"failed": f"{type(exc).__name__}: {exc}"[:1500]}
        if "skipped" in columns[name]:
            say(f"  {COLUMNS[name]}: skipped: {columns[name]['skipped']}")
    report = {"cores": os.cpu_count(), "shape": shape.__dict__, "columns": columns, "ratios": ratios(columns),
              "ceiling_ratios": ratios(columns, key="ceiling_per_s"),
              "tracing": {"sampler": sampler.describe(), "source": sampler_source},
              "signer_processes": os.environ.get(SIGNER_PROCESSES_ENV, "").strip() or "1"}
    (base / "compare.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if as_json else table(report))
    ran = [c for c in columns.values() if "skipped" not in c]
    ok = all("runs" in c and all(r["errors"] == 0 and r["issued"] > 0 for r in c["runs"].values())
             and c["verified"]["failed"] == 0 for c in ran)
    return 0 if ok else 1
