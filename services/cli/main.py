"""`hapki`: the command line. Each subcommand parses its arguments and calls into the services or the lab."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from hapki.cli import commands
from hapki.contracts.errors import ConfigInvalid
from hapki.runtime import telemetry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hapki", description="hapki: high-availability PKI (CLM + CARA)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=["clm", "cara", "watcher"])
    serve.add_argument("--config", type=Path, required=True, help="service config (TOML)")
    serve.add_argument("--supervise", action="store_true",
                       help="run the service in a forked child, restarted at once if it dies (imports done once)")

    ca = sub.add_parser("ca", help="certificate authority administration")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create the root and issuing CA with keys in the HSM")
    init.add_argument("--config", type=Path, required=True, help="CARA config (TOML): database and HSM")
    init.add_argument("--out", type=Path, default=None, help="also write root.pem and issuing.pem here")
    ca_list = ca_sub.add_parser(
        "list", help="the issuing CAs: which one is issued from, their validity, OCSP responder, audit signer, "
        "latest CRL and certificates issued")
    ca_list.add_argument("--config", type=Path, required=True, help="CARA config (TOML): the database")
    ca_list.add_argument("--json", action="store_true", help="print JSON")
    rekey = ca_sub.add_parser(
        "ocsp-rekey", help="a new OCSP responder key (in the HSM) and certificate for an issuing CA; every CARA "
        "member signs its answers under it within [ocsp] signer_check_seconds")
    rekey.add_argument("--config", type=Path, required=True, help="CARA config (TOML): database and HSM")
    rekey.add_argument("--issuer", default=None, help="the issuing CA's name (default: the one issued from)")
    revoke_issuer = ca_sub.add_parser(
        "revoke-issuer", help="the root revokes an issuing CA (not the one issued from: roll over first) and signs "
        "its CRL (the ARL, /crl/root.crl) at once")
    revoke_issuer.add_argument("--config", type=Path, required=True, help="CARA config (TOML): database and HSM")
    revoke_issuer.add_argument("--name", required=True, help="the issuing CA's name (`hapki ca list`)")
    revoke_issuer.add_argument("--reason", required=True, choices=ISSUER_REVOCATION_REASONS,
                               help="RFC 5280 reason: key_compromise (its key is out), ca_compromise, "
                               "affiliation_changed, superseded (rolled over, retired early), cessation_of_operation")
    arl = ca_sub.add_parser("arl", help="sign the root's CRL (the ARL) again: at least every 12 months")
    arl.add_argument("--config", type=Path, required=True, help="CARA config (TOML): database and HSM")
    rollover = ca_sub.add_parser(
        "rollover", help="create a new issuing CA under the same root and issue from it from now on; the one "
        "before keeps answering OCSP and publishing CRLs for what it issued")
    rollover.add_argument("--config", type=Path, required=True, help="CARA config (TOML): database and HSM")
    rollover.add_argument("--name", default=None,
                          help="the new issuer's name (in CRL URLs; default: issuing-N); an existing one that is "
                          "not the default yet finishes an interrupted rollover")
    rollover.add_argument("--common-name", default=None,
                          help="the new issuing CA's CN (default: '<O> Issuing CA N' after the current one's O)")
    rollover.add_argument("--out", type=Path, default=None, help="also write <name>.pem (the new issuing CA) here")

    clm = sub.add_parser("clm", help="registration authority administration")
    clm_sub = clm.add_subparsers(dest="clm_command", required=True)
    keygen = clm_sub.add_parser("keygen", help="create CLM's approval key pair (P-256) for signing requests")
    keygen.add_argument("--out", type=Path, required=True,
                        help="private key file to create (mode 0600; never overwritten): CLM's approval_key_file")
    keygen.add_argument("--public", type=Path, default=None,
                        help="public key file for CARA's approval_public_keys (default: --out with suffix .pub)")
    keygen.add_argument("--algorithm", choices=("p256", "ed25519"), default="p256",  # approval.ALGORITHMS
                        help="p256 (ECDSA, deterministic; the default, cheaper to sign and verify) or ed25519 "
                        "(what keys made before p256 use; still accepted)")

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    mig = db_sub.add_parser("migrate", help="apply pending schema migrations, then the service users' grants")
    mig.add_argument("--config", type=Path, required=True,
                     help="a config with a [database] section naming the admin user (DDL, GRANT OPTION, CREATE USER)")
    mig.add_argument("--account", action="append", default=[], metavar="USER@HOST",
                     help="the account of a service user to grant to (repeatable; default hapki_clm@%% and "
                          "hapki_cara@%%); the accounts must exist")
    mig.add_argument("--no-grants", action="store_true", help="apply the migrations only")
    check = db_sub.add_parser("check", help="check the DESIGN.md invariants on the database of a running site, and "
                                            "that every node's settings let commits survive a power cut of the "
                                            "whole site; exit 1 naming every violating row and setting")
    check.add_argument("--config", type=Path, required=True,
                       help="a config with a [database] section (the admin's, or an account that may read every table)")
    check.add_argument("--settle", type=float, default=300.0, metavar="SECONDS",
                       help="a reserved signing intent or a pending request counts only when older than this (in "
                            "flight is not lost); 0: the site is quiet, every one counts")
    check.add_argument("--rows", type=int, default=5, help="violating rows printed per invariant")
    check.add_argument("--json", action="store_true", help="print the report as JSON (every violating row)")

    bak = db_sub.add_parser("backup", help="write a consistent backup of the site's database (mariadb-dump of one "
                                           "snapshot, gzip) with a manifest beside it; audited")
    bak.add_argument("--config", type=Path, required=True,
                     help="a config with a [database] section (an account that may read every table, e.g. the admin)")
    bak.add_argument("--out", type=Path, required=True, help="the backup file (FILE.sql.gz; FILE.sql.gz.manifest.json "
                                                           "is written beside it)")
    bak.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    res = db_sub.add_parser("restore", help="load a backup into a database that holds no site data (a rebuilt "
                                            "cluster), after checking it against its manifest; then check the "
                                            "invariants and the audit chain; audited")
    res.add_argument("--config", type=Path, required=True,
                     help="a config with a [database] section naming the admin user (the restore drops and creates "
                          "the tables)")
    res.add_argument("--backup", type=Path, required=True, help="the backup file written by `hapki db backup`")
    res.add_argument("--replace", action="store_true",
                     help="overwrite a database that holds a site's data (what it held since the backup is lost)")

    audit = sub.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the audit hash chain; exit 1 naming the first broken entry")
    verify.add_argument("--config", type=Path, required=True, help="any service config with a [database] section")
    verify.add_argument("--grace", type=float, default=60.0,
                        help="seconds an entry may stay unchained before that is a finding (sealer down)")
    verify.add_argument("--anchor", default=None, metavar="SEQ:HASH",
                        help="a head printed by an earlier verify and kept elsewhere: it must still be in the chain")
    verify.add_argument("--root", type=Path, default=None, metavar="PEM",
                        help="the site's root CA certificate, kept elsewhere: checkpoints count only when signed by "
                        "an audit signer of an issuing CA this root certified (the database's issuers are not "
                        "trusted on their own)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    issue = sub.add_parser("issue", help="request a certificate over NATS")
    issue.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL(s), comma-separated")
    issue.add_argument("--nats-user", help="bus user (the lab's client user: see `hapki lab status --json`)")
    issue.add_argument("--nats-password-file", type=Path, help="file holding the bus user's password")
    issue.add_argument("--nats-ca", type=Path, help="CA bundle of the NATS servers' certificates (TLS)")
    issue.add_argument("--profile", default="tls-server")
    issue.add_argument("--csr", type=Path, help="PEM CSR; without it a P-256 key and CSR are generated")
    issue.add_argument("--name", action="append", default=[], help="DNS name / IP / email (repeatable)")
    issue.add_argument("--requester", default="hapki-cli")
    issue.add_argument("--idempotency-key", default=None)
    issue.add_argument("--out", type=Path, default=Path("."), help="directory for cert.pem, chain.pem (key.pem)")
    issue.add_argument("--timeout", type=float, default=30.0, help="seconds")

    docs = sub.add_parser("docs", help="generated documents")
    docs.add_argument("what", choices=["asyncapi"])
    docs.add_argument("--check", action="store_true", help="fail if the committed document is stale")

    comp = sub.add_parser("compose", help="the Docker Compose demo, rendered from compose/topology.toml")
    comp_sub = comp.add_subparsers(dest="compose_command", required=True)
    comp_render = comp_sub.add_parser("render", help="write compose/docker-compose.yml and the configs it mounts")
    comp_render.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    comp_init = comp_sub.add_parser("init", help="(in the demo's init container) create every secret into volumes")
    comp_init.add_argument("--secrets", type=Path, required=True, help="the `secrets` volume")
    comp_init.add_argument("--hsm", type=Path, required=True, help="where the HSM volumes are mounted")
    comp_init.add_argument("--no-chown", action="store_true", help="leave file owners alone (not as root)")
    comp_prov = comp_sub.add_parser("provision", help="(in the demo's provision container) database, streams, CA")
    comp_prov.add_argument("--cara-config", type=Path, required=True, help="a CARA member's config (for ca init)")
    comp_prov.add_argument("--socket", type=Path, required=True, help="db-1's server socket (root)")
    comp_prov.add_argument("--hsm", type=Path, required=True, help="where the HSM volumes are mounted")
    comp_prov.add_argument("--secrets", type=Path, default=Path("/run/hapki"), help="this container's secrets")

    demo = sub.add_parser("demo", help="start NATS, MariaDB, SoftHSM, CARA and CLM locally and issue a certificate")
    demo.add_argument("--dir", type=Path, default=Path(".run/demo"), help="working directory of the demo")
    demo.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")

    trace = sub.add_parser("trace", help="print the trace of one issuance as a tree with timings, from span files;"
                                         " or, with --stages, where the time of every traced issuance went")
    trace.add_argument("request_id", nargs="?", help="the request id (IssueReply.request_id, 32 hex digits)")
    trace.add_argument("--stages", action="store_true",
                       help="instead of one request: per stage (client, clm, bus, cara, hsm, db) p50/p90/p99/max of "
                            "every complete issuance trace in the files, and the slowest traces' ids")
    trace.add_argument("--slowest", type=int, default=5, metavar="N", help="--stages: list the N slowest traces")
    trace.add_argument("--file", type=Path, action="append", default=[], metavar="PATH",
                       help="JSON-lines span file (repeatable; default: the lab's and the demo's, "
                            ".run/lab/traces.jsonl and .run/demo/traces.jsonl, those that exist)")
    trace.add_argument("--wait", type=float, default=0.0,
                       help="seconds to keep looking while the request's spans are not there yet (services export "
                            "spans in batches, up to 5 s late)")

    fuzz = sub.add_parser("fuzz", help="fuzz a parser of untrusted input: N inputs, bounded in time; exit 1 on a crash")
    fuzz.add_argument("--target", choices=["csr", "contracts", "ocsp", "all"], required=True)
    fuzz.add_argument("--runs", type=int, default=1_000_000, help="inputs to run (per target)")
    fuzz.add_argument("--seconds", type=float, default=600.0, help="time bound per target, seconds")
    fuzz.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto",
                      help="atheris (coverage-guided, pip install -e .[fuzz]) or the built-in mutator; auto: atheris "
                           "if installed")
    fuzz.add_argument("--out", type=Path, default=None, help="keep corpus and findings here (default: a temporary "
                                                             "directory, kept only when something crashed)")
    fuzz.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="measure issuance throughput and latency on a local stack")
    bench.add_argument("--dir", type=Path, default=Path(".run/bench"))
    bench.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrency levels")
    bench.add_argument("--seconds", type=float, default=10.0, help="duration of each level")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--ocsp", metavar="LEVELS", default=None,
                       help="instead of issuance: OCSP responses/s through the HA lab's CARA VIP at these comma-separated"
                            " concurrency levels (root; the lab is brought up if it is not)")
    bench.add_argument("--ocsp-nonce", action="store_true",
                       help="--ocsp: every request carries a nonce, so every answer is read and signed by CARA (the "
                            "path without caches, for comparison)")
    bench.add_argument("--ocsp-rate", type=float, default=None,
                       help="--ocsp: pace the clients to this many requests a second in all (latency measured from "
                            "each request's scheduled time); default: closed loop, as fast as answers come")
    bench.add_argument("--crl", metavar="N", type=int, default=None,
                       help="instead of issuance: CRL generation time with N revoked entries (local stack)")
    bench.add_argument("--lab-dir", type=Path, default=Path(".run/lab"),
                       help="--ocsp, --compare --with-lab: the lab's directory")
    bench.add_argument("--compare", action="store_true",
                       help="instead: side by side under one k6 load: raw limit, CFSSL + MariaDB, hapki single node "
                            "(and the HA lab with --with-lab); --seconds per run")
    bench.add_argument("--columns", default="raw,cfssl,single,lab",
                       help="--compare: which of raw,cfssl,single,lab to run")
    bench.add_argument("--rate", default="300",
                       help="--compare: arrivals/s of the fixed-rate run; several, comma-separated (50,100,300): one "
                            "run each, in order (the load curve)")
    bench.add_argument("--vus", type=int, default=32, help="--compare: closed-loop clients of the max-load run")
    bench.add_argument("--warmup", type=float, default=3.0, help="--compare: warm-up seconds per column")
    bench.add_argument("--with-lab", action="store_true",
                       help="--compare: also load the HA lab (it must be up; one lab per host: only your own)")
    bench.add_argument("--signer-processes", metavar="N", type=int, default=None,
                       help="CARA signer processes of the local stack it starts (HAPKI_SIGNER_PROCESSES, 1..16; "
                            "default: the config's, 1). The HA lab's members keep what `hapki lab up` started them "
                            "with")
    bench.add_argument("--growth", metavar="N", type=int, default=None,
                       help="instead: issuance rate and OCSP latency on an empty database, then with N certificates "
                            "preloaded (bulk SQL), and EXPLAIN of the hot-path queries")

    k6 = sub.add_parser("k6", help="helpers of the k6 scripts in k6/: their CSR pool, the failover gap")
    k6.add_argument("action", choices=["csrs", "gap"],
                    help="csrs: write a JSON array of P-256 CSRs to PATH (CSR_FILE of the scripts); gap: read "
                         "`k6 run --out json=PATH k6/failover.js` and print issuance second by second")
    k6.add_argument("path", type=Path)
    k6.add_argument("--count", type=int, default=512, help="csrs: how many")
    k6.add_argument("--json", action="store_true", help="gap: print JSON")

    lab = sub.add_parser("lab", help="the HA lab: the reference topology in network namespaces on this host (root)")
    lab.add_argument("action", choices=["up", "down", "status", "demo", "restart"],
                     help="demo: up, load through a crash of the active CA member, timeline, down; "
                          "restart NAME: one process of the running lab (e.g. clm@clm-2), ready when it returns")
    lab.add_argument("name", nargs="?", help="restart: the process, as `hapki lab status` names it (kind@member)")
    lab.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="restart: set KEY in the service's environment (KEY= removes it); kept until changed")
    lab.add_argument("--dir", type=Path, default=Path(".run/lab"), help="working directory of the lab")
    lab.add_argument("--json", action="store_true", help="status: print JSON")
    lab.add_argument("--fresh", action="store_true", help="up: wipe the lab's data (databases, tokens, certs) first")
    lab.add_argument("--seconds", type=float, default=12.0, help="demo: seconds of load")
    lab.add_argument("--rate", type=float, default=20.0, help="demo: requests per second")
    lab.add_argument("--keep", action="store_true", help="demo: leave the lab running afterwards")

    chaos = sub.add_parser("chaos", help="the fault suite: single failures under load against the HA lab (root)")
    chaos.add_argument("--scenario", action="append", default=[], metavar="NAME",
                       help="scenario to run (repeatable; default: all): cara-crash, cara-graceful, cara-link, "
                            "cara-split-brain, signer-crash, cara-kill, clm-crash, clm-kill, db-node-kill, "
                            "db-partition, db-minority, hsm-member-down, nats-node-kill")
    chaos.add_argument("--runs", type=int, default=1, help="runs per scenario")
    chaos.add_argument("--rate", type=float, default=100.0, help="requests per second (half NATS, half HTTPS)")
    chaos.add_argument("--seconds", type=float, default=None,
                       help="seconds of load per run (default: per scenario, a few seconds around the fault)")
    chaos.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    chaos.add_argument("--dir", type=Path, default=Path(".run/lab"), help="working directory of the lab")
    return p


def _fuzz(args: argparse.Namespace) -> int:
    from hapki.cli import fuzz  # imports the parsers only when asked

    return fuzz.main(args)


# RFC 5280 5.3.1 reasons that make sense for a CA certificate (cryptography's ReasonFlags names).
ISSUER_REVOCATION_REASONS = ("key_compromise", "ca_compromise", "affiliation_changed", "superseded",
                             "cessation_of_operation")


def _k6(args: argparse.Namespace) -> int:
    from hapki.cli import k6

    return k6.main(args.action, args.path, args.count, args.json)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    telemetry.quiet_asyncio_tls_eof()  # a bench's or the lab's NATS connections over TLS log it when they end
    handler = {
        "serve": commands.serve,
        "ca": commands.ca,
        "clm": commands.clm_keygen,
        "db": commands.db,
        "audit": commands.audit_verify,
        "issue": commands.issue,
        "docs": commands.docs,
        "compose": commands.compose,
        "demo": commands.demo,
        "bench": commands.bench,
        "fuzz": _fuzz,
        "k6": _k6,
        "trace": commands.trace,
        "lab": commands.lab,
        "chaos": commands.chaos,
    }[args.command]
    try:
        if not asyncio.iscoroutinefunction(handler):
            return handler(args)
        if args.command == "serve":
            from hapki.runtime import eventloop

            if args.supervise:
                return commands.supervise(args)

            return eventloop.run(handler(args))  # uvloop (see hapki.runtime.eventloop)
        return asyncio.run(handler(args))
    except ConfigInvalid as exc:  # a config file any subcommand reads: one line, not a traceback
        print(f"hapki {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
