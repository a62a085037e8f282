"""Implementations of the `hapki` subcommands: parse arguments, call the core, print."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, ValidationError

from hapki.contracts.errors import ConfigInvalid, HapkiError
from hapki.runtime import telemetry
from hapki.runtime.config import DatabaseConfig, load_toml, validation_summary

if TYPE_CHECKING:  # the subcommands import their service modules lazily, to start fast
    from hapki.cara.config import CaraConfig
    from hapki.cara.ports import IssuerRecord
    from hapki.cara.revocation_store import MariaDBRevocationStore
    from hapki.cara.store import MariaDBSigningStore
    from hapki.runtime.db import Database
    from hapki.runtime.hsm import HSMMemberConfig, HSMPool

log = logging.getLogger("hapki.cli")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def load_service(service: str, path: Path) -> tuple[Callable[[Any], Any], BaseModel]:
    """The runtime class of `hapki serve <service>` and its validated config (importing the service's modules)."""
    if service == "clm":
        from hapki.clm.config import ClmConfig
        from hapki.clm.main import ClmRuntime

        return ClmRuntime, load_toml(path, ClmConfig)
    if service == "cara":
        from hapki.cara.config import CaraConfig, with_env
        from hapki.cara.main import CaraRuntime

        try:
            return CaraRuntime, with_env(load_toml(path, CaraConfig))  # HAPKI_SIGNER_PROCESSES
        except ValueError as exc:  # the override's (a ValidationError is a ValueError too)
            detail = validation_summary(exc) if isinstance(exc, ValidationError) else str(exc)
            raise ConfigInvalid(f"{path} with the environment's overrides: {detail}") from exc
    from hapki.watcher.main import WatcherConfig, WatcherRuntime

    return WatcherRuntime, load_toml(path, WatcherConfig)


def _startable(args: argparse.Namespace) -> tuple[Callable[[Any], Any], BaseModel] | None:
    """The service's runtime class and config, once the config file and the tracing environment
    (OTEL_TRACES_SAMPLER*, HAPKI_TRACE_FILE_*) are valid; else None, having said in one line what is not."""
    try:
        telemetry.check_env()
        return load_service(args.service, args.config)
    except (ValueError, ConfigInvalid) as exc:
        print(f"hapki serve {args.service}: {exc}", file=sys.stderr)
        return None


def supervise(args: argparse.Namespace) -> int:
    """`hapki serve <service> --supervise`: validate the config and import everything once, then run the service
    in forked children, started again at once when one dies (hapki.runtime.supervise)."""
    from hapki.runtime import eventloop
    from hapki.runtime.http import serve as _http  # noqa: F401  (imported once, for every child)
    from hapki.runtime.metrics import metrics_app  # noqa: F401
    from hapki.runtime.supervise import Supervisor

    telemetry.setup_logging()
    loaded = _startable(args)  # a bad config fails here, once, not in a restart loop
    if loaded is None:
        return 2
    eventloop.loop_factory()  # imports uvloop
    return Supervisor(f"hapki {args.service}", lambda: eventloop.run(serve(args, loaded))).run()


async def serve(args: argparse.Namespace, loaded: tuple[Callable[[Any], Any], BaseModel] | None = None) -> int:
    from hapki.runtime.http import serve as serve_http
    from hapki.runtime.metrics import metrics_app

    telemetry.setup_logging()
    loaded = loaded or _startable(args)
    if loaded is None:
        return 2
    telemetry.setup(f"hapki-{args.service}")
    try:
        from hapki.runtime.metrics import State
        from hapki.runtime.supervise import start_count

        State.of("hapki.process.starts").set(start_count(), {"pki.service": args.service})
        from hapki.runtime.startup import start_when_available

        runtime_class, config = loaded
        listen = config.metrics.listen  # type: ignore[attr-defined]
        # /metrics first: a port taken by another process stops the start before anything connects.
        scrape = await serve_http(metrics_app(), listen) if listen else None
        # Started before its database or bus (a whole site booting at once): it waits for them (hapki.runtime.startup).
        runtime = await start_when_available(lambda: runtime_class(config), service=f"hapki {args.service}",
                                             wait_seconds=config.startup_wait_seconds)  # type: ignore[attr-defined]
        print(f"hapki {args.service} ready", flush=True)
        await _until_signalled()
        await runtime.stop()
        if scrape is not None:
            await scrape.cleanup()
    finally:
        telemetry.shutdown()
    return 0


DEFAULT_TRACE_FILES = (Path(".run/lab/traces.jsonl"), Path(".run/demo/traces.jsonl"))


def trace(args: argparse.Namespace) -> int:
    """`hapki trace <request-id>`: the request's trace(s) as trees; exit 1 when no span names the request.
    `hapki trace --stages`: the stage split of every complete issuance trace in the files (exit 1 if none)."""
    from hapki.lab.traces import (
        issuance_stages, load_spans, spans_of_request, stage_table, trace_tree, traces_of_request,
    )

    if bool(args.stages) == bool(args.request_id):
        print("hapki trace: give a request id, or --stages (not both)", file=sys.stderr)
        return 2
    files = list(args.file) or [f for f in DEFAULT_TRACE_FILES if f.exists()]
    if not files:
        known = ", ".join(map(str, DEFAULT_TRACE_FILES))
        print(f"no span file: pass --file, or run the lab or the demo (they write {known})", file=sys.stderr)
        return 1
    if args.stages:
        per_trace = issuance_stages(span for path in files for span in load_spans(path))
        print(stage_table(per_trace, slowest=max(0, args.slowest)))
        return 0 if per_trace else 1
    deadline = time.monotonic() + args.wait
    while True:
        spans = spans_of_request(files, args.request_id)
        trace_ids = traces_of_request(spans, args.request_id)
        # The CA's spans end last: wait for cara.sign too, so the tree is whole when it is printed.
        if any(s.get("name") == "cara.sign" for s in spans) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not trace_ids:
        print(f"no span names request {args.request_id} in {', '.join(map(str, files))}", file=sys.stderr)
        return 1
    for number, trace_id in enumerate(trace_ids, start=1):
        header = f"trace {trace_id} of request {args.request_id}"
        print(header + (f" ({number} of {len(trace_ids)})" if len(trace_ids) > 1 else ""))
        print(trace_tree(spans, trace_id))
    return 0


@contextlib.asynccontextmanager
async def _ca_site(args: argparse.Namespace, actor: str, *, log_level: str = "INFO") -> AsyncIterator[
        tuple[CaraConfig, Database, MariaDBSigningStore, MariaDBRevocationStore]]:
    """What every `hapki ca` subcommand works on: the CARA config (`--config`), its database with the schema
    checked (or migrated, by a user that may), and CARA's two stores on it, audited as `actor`; closed after."""
    from hapki.cara.config import CaraConfig
    from hapki.cara.revocation_store import MariaDBRevocationStore
    from hapki.cara.store import MariaDBSigningStore
    from hapki.runtime.db import Database
    from hapki.runtime.migrate import migrate

    telemetry.setup_logging(log_level)
    cfg = load_toml(args.config, CaraConfig)
    db = Database(cfg.database)
    try:
        await migrate(db)
        yield cfg, db, MariaDBSigningStore(db, actor=actor), MariaDBRevocationStore(db, actor=actor)
    finally:
        await db.close()


async def ca(args: argparse.Namespace) -> int:
    return await {"init": ca_init, "list": ca_list, "ocsp-rekey": ca_ocsp_rekey, "rollover": ca_rollover,
                  "revoke-issuer": ca_revoke_issuer, "arl": ca_arl}[args.ca_command](args)


async def ca_ocsp_rekey(args: argparse.Namespace) -> int:
    """A new responder key and certificate for an issuing CA (the renewal certifies the same key again, forever):
    a routine key rotation. The one before stays valid until it ends (it carries ocsp-nocheck: not revocable)."""
    from hapki.cara.main import hsm_pool
    from hapki.contracts.errors import NotFound

    async with _ca_site(args, "cli:ca-ocsp-rekey") as (cfg, db, store, revocations):
        try:
            issuer = await store.load_issuer(args.issuer or cfg.issuer)
        except NotFound as exc:
            print(exc.message, file=sys.stderr)
            return 2
        members = _hsm_members(cfg) if len(cfg.hsm.members) > 1 else []
        with hsm_pool(cfg.hsm, rw=True) as pool:  # the ceremony creates a key
            await _add_signer(pool, "ocsp", db, store, revocations, issuer, members)
    print(f"every CARA member signs the OCSP answers about {issuer.name!r} under the new responder within "
          f"{cfg.ocsp.signer_check_seconds:g} s; answers signed before stay valid with the responder before")
    return 0


async def ca_list(args: argparse.Namespace) -> int:
    """The issuing CAs of a site, newest first: what an operator checks before and after `hapki ca rollover`."""
    from hapki.cara.revocation_store import ROOT_CRL_ISSUER
    from hapki.runtime.audit import audit_signer
    from hapki.runtime.clock import utcnow

    async with _ca_site(args, "cli:ca-list", log_level="WARNING") as (cfg, db, store, revocations):
        issuers, default = await store.load_issuers()
        issued = await store.issued_per_issuer()
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for record in reversed(issuers):
            cert = record.certificate
            responder = await revocations.ocsp_signer(record.name)
            crl = await revocations.latest_crl(record.name, delta=False)
            rows.append({
                "name": record.name, "default": record.name == default,
                "issued_from": record.name == (cfg.issuer or default),
                "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
                "days_left": (cert.not_valid_after_utc - now).days, "key_id": record.key_id.hex(),
                "certificates": issued.get(record.name, 0),
                "ocsp_responder_not_after": None if responder is None
                else responder.certificate.not_valid_after_utc.isoformat(),
                "audit_signer": await audit_signer(db, record.name) is not None,
                "full_crl": None if crl is None else {"number": crl.number, "entries": crl.entries,
                                                      "this_update": crl.this_update.isoformat()},
                "revoked": None if record.revoked_at is None else {"at": record.revoked_at.isoformat(),
                                                                   "reason": record.revocation_reason},
            })
        arl = await revocations.latest_crl(ROOT_CRL_ISSUER, delta=False)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no issuing CA: run `hapki ca init`")
    for row in rows:
        role = " (default, issued from)" if row["issued_from"] and row["default"] else \
            " (issued from: pinned by this config)" if row["issued_from"] else " (default)" if row["default"] else ""
        if row["revoked"] is not None:
            role += f" REVOKED by the root {row['revoked']['at'][:16]} UTC ({row['revoked']['reason']})"
        crl = row["full_crl"]
        crl_text = "none yet" if crl is None else (f"{crl['number']} of {crl['this_update'][:16]} UTC, "
                                                   f"{crl['entries']} entries")
        responder = row["ocsp_responder_not_after"]
        print(f"{row['name']}{role}: {row['subject']}\n"
              f"  valid {row['not_before'][:10]} to {row['not_after'][:10]} ({row['days_left']} days left), "
              f"certified by {row['issuer']}, key {row['key_id']}\n"
              f"  {row['certificates']} certificates; full CRL {crl_text}; OCSP responder until "
              f"{responder[:10] if responder else 'none (run `hapki ca init`)'}; "
              f"audit signer {'yes' if row['audit_signer'] else 'none'}")
    if rows:
        print("root CRL (ARL): " + ("none signed yet (`hapki ca arl`)" if arl is None else
                                    f"{arl.number}, {arl.entries} revoked issuing CA(s), valid until "
                                    f"{arl.next_update:%Y-%m-%d} (`hapki ca arl` signs it again)"))
    return 0


async def ca_init(args: argparse.Namespace) -> int:
    from hapki.cara.ca_init import create_hierarchy
    from hapki.cara.main import hsm_pool
    from hapki.cara.ports import IssuerRecord
    from hapki.cara.revocation_store import ROOT_CRL_ISSUER
    from hapki.contracts.errors import NotFound
    from hapki.runtime.audit import audit_signer
    from hapki.runtime.clock import utcnow

    async with _ca_site(args, "cli:ca-init") as (cfg, db, store, revocations):
        try:
            existing = await store.load_issuer(cfg.issuer)
        except NotFound:
            existing = None
        if existing is not None:
            responder = await revocations.ocsp_signer(existing.name)
            missing = [purpose for purpose, found in (
                ("ocsp", responder), ("audit", await audit_signer(db, existing.name)),
            ) if found is None]
            if await revocations.latest_crl(ROOT_CRL_ISSUER, delta=False) is None:  # a CA from before the ARL
                with hsm_pool(cfg.hsm) as pool:
                    await _sign_arl(pool, db, store)
            if not missing:
                assert responder is not None
                print(f"CA already initialised: issuer {existing.name!r}; nothing to do (its OCSP responder "
                      f"certificate ends {responder.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; the active "
                      f"CARA member renews it when {cfg.ocsp.signer_renew_before_days} days are left)")
                return 0
            # A CA from before OCSP or the audit log: add the missing signers (the cluster KEK of the first ceremony
            # is still in the tokens, so the new keys are replicated like the CA keys).
            members = _hsm_members(cfg) if len(cfg.hsm.members) > 1 else []
            with hsm_pool(cfg.hsm, rw=True) as pool:  # the ceremony creates keys
                for purpose in missing:
                    await _add_signer(pool, purpose, db, store, revocations, existing, members)
            return 0
        # Two or more HSMs: the CA keys are generated once and replicated under a cluster KEK, which the SO of
        # each token imports first, before the pool logs in as user (SO and user cannot share a login).
        # The SO PIN is a ceremony-time secret, not CARA runtime config: it sits beside the user PIN file as
        # <name>.so-pin (how hapki.lab.local.SoftHSM writes them).
        from hapki.runtime.hsm_replication import provision_kek

        members = _hsm_members(cfg)
        replicate_across: list[HSMMemberConfig] = []
        if len(members) > 1:
            so_pin_files = {m.name: m.pin_file.with_name(m.pin_file.name.removesuffix(".pin") + ".so-pin")
                            for m in members}
            missing = [str(path) for path in so_pin_files.values() if not path.exists()]
            if missing:
                print(f"{len(members)} HSM members need their SO PIN files to replicate the CA keys; missing: "
                      f"{', '.join(missing)}", file=sys.stderr)
                return 2
            await asyncio.to_thread(provision_kek, members, so_pin_files)
            replicate_across = members
        pem = serialization.Encoding.PEM
        name = cfg.issuer or "issuing-1"
        with hsm_pool(cfg.hsm, rw=True) as pool:  # the ceremony creates keys
            hierarchy = await asyncio.to_thread(create_hierarchy, pool, now=utcnow(),
                                                replicate_across=replicate_across,
                                                root_crl_url=_root_crl_url(cfg))
            issuing_pem = hierarchy.issuing_cert.public_bytes(pem).decode()
            root_pem = hierarchy.root_cert.public_bytes(pem).decode()
            record = IssuerRecord(name=name, cert_pem=issuing_pem, chain_pem=issuing_pem + root_pem,
                                  key_id=hierarchy.issuing_key_id)
            await store.save_issuer(record, default=True, now=utcnow())
            for purpose in ("ocsp", "audit"):
                await _add_signer(pool, purpose, db, store, revocations, record, replicate_across)
            await _sign_arl(pool, db, store)  # empty: issuing CA certificates may name it, it must be there
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "root.pem").write_text(root_pem)
            (args.out / "issuing.pem").write_text(issuing_pem)
        print(f"created root CA {hierarchy.root_cert.subject.rfc4514_string()}")
        print(f"created issuing CA {name!r}: {hierarchy.issuing_cert.subject.rfc4514_string()}")
        return 0


_ISSUER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # it names the CRL: /crl/<name>.crl


async def ca_rollover(args: argparse.Namespace) -> int:
    """A new issuing CA under the current one's root, with its OCSP responder and audit signer, made the default:
    every CARA member issues from it within `issuers_check_seconds`; the one before keeps serving OCSP and CRLs."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from hapki.cara.ca_init import create_issuing_ca
    from hapki.cara.main import hsm_pool
    from hapki.cara.ports import IssuerRecord
    from hapki.cara.revocation_store import ROOT_CRL_ISSUER
    from hapki.runtime.audit import audit_signer
    from hapki.runtime.clock import utcnow

    async with _ca_site(args, "cli:ca-rollover") as (cfg, db, store, revocations):
        issuers, default = await store.load_issuers()
        by_name = {record.name: record for record in issuers}
        if default is None:
            print("no issuing CA is the default: run `hapki ca init` first", file=sys.stderr)
            return 2
        name = args.name if args.name is not None else next(
            f"issuing-{n}" for n in range(len(issuers) + 1, 10_000) if f"issuing-{n}" not in by_name)
        if not _ISSUER_NAME.match(name) or name.endswith("-delta") or name == ROOT_CRL_ISSUER:
            print(f"--name {name!r}: letters, digits, '.', '_' and '-', 1 to 64, not ending in -delta and not "
                  f"{ROOT_CRL_ISSUER!r} (it names the CRL files)", file=sys.stderr)
            return 2
        if name == default:
            print(f"issuer {name!r} is the default already; nothing to do")
            return 0
        current = by_name[default]
        members = _hsm_members(cfg) if len(cfg.hsm.members) > 1 else []
        with hsm_pool(cfg.hsm, rw=True) as pool:  # the ceremony creates keys
            record = by_name.get(name)
            if record is not None and record.revoked_at is not None:
                print(f"issuing CA {name!r} was revoked at {record.revoked_at:%Y-%m-%d %H:%M} UTC "
                      f"({record.revocation_reason}): nothing may issue from it", file=sys.stderr)
                return 1
            if record is None:
                chain = x509.load_pem_x509_certificates(current.chain_pem.encode())
                orgs = current.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
                org = str(orgs[0].value) if orgs else "hapki"
                common_name = args.common_name or f"{org} Issuing CA {len(issuers) + 1}"
                try:
                    made = await asyncio.to_thread(create_issuing_ca, pool, root_cert=chain[-1],
                                                   common_name=common_name, org=org, now=utcnow(),
                                                   replicate_across=members, root_crl_url=_root_crl_url(cfg))
                except (ValueError, HapkiError) as exc:  # the root key not found, an HSM member down: nothing made
                    print(f"no rollover, nothing changed: {exc}", file=sys.stderr)
                    return 1
                pem = made.cert.public_bytes(serialization.Encoding.PEM).decode()
                parents = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain[1:])
                record = IssuerRecord(name=name, cert_pem=pem, chain_pem=pem + parents, key_id=made.key_id)
                await store.save_issuer(record, default=False, now=utcnow())
                print(f"created issuing CA {name!r}: {made.cert.subject.rfc4514_string()}, valid until "
                      f"{made.cert.not_valid_after_utc:%Y-%m-%d}")
            else:
                print(f"issuing CA {name!r} exists and is not the default: finishing its rollover")
            # Its signers before it becomes the default: a member that switches finds them.
            try:
                if await revocations.latest_crl(ROOT_CRL_ISSUER, delta=False) is None:  # the new CA may name it
                    await _sign_arl(pool, db, store)
                if await revocations.ocsp_signer(name) is None:
                    await _add_signer(pool, "ocsp", db, store, revocations, record, members)
                if await audit_signer(db, name) is None:
                    await _add_signer(pool, "audit", db, store, revocations, record, members)
            except (ValueError, HapkiError) as exc:
                print(f"issuing CA {name!r} is stored but not the default, and nothing issues from it: {exc}; "
                      f"finish with `hapki ca rollover --config {args.config} --name {name}`", file=sys.stderr)
                return 1
        before = await store.make_default(name, now=utcnow())
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.pem").write_text(record.cert_pem)
        print(f"issuer {name!r} is the default from now on (it was {before!r}): every CARA member issues from it "
              f"within {cfg.issuers_check_seconds:g} s; {before!r} keeps answering OCSP and publishing CRLs")
        if cfg.issuer is not None:
            print(f"note: this config pins issuer {cfg.issuer!r} ([issuer] in the CARA config); members that pin "
                  "one keep issuing from it", file=sys.stderr)
        return 0


def _root_crl_url(cfg: CaraConfig) -> str | None:
    """Where issuing CA certificates made now point for the root's CRL (the ARL), under the CARA VIP's public URL."""
    from hapki.cara.issuance import Distribution
    from hapki.cara.revocation_store import ROOT_CRL_ISSUER

    found = Distribution.at(cfg.public_url, ROOT_CRL_ISSUER)
    return None if found is None else found.crl_url


async def ca_revoke_issuer(args: argparse.Namespace) -> int:
    """The root revokes an issuing CA (its key compromised, or retired): on the root's CRL (the ARL) at once; its
    members answer OCSP about what it issued with `revoked`; nothing may issue from it."""
    from hapki.cara.main import hsm_pool
    from hapki.runtime.clock import utcnow

    async with _ca_site(args, "cli:ca-revoke-issuer") as (cfg, db, store, _):
        try:
            await store.revoke_issuer(args.name, reason=args.reason, now=utcnow())
        except HapkiError as exc:
            print(f"not revoked: {exc.message}", file=sys.stderr)
            return 1
        print(f"issuing CA {args.name!r} revoked ({args.reason})")
        with hsm_pool(cfg.hsm) as pool:  # signing with the root key needs no read/write session
            return await _sign_arl(pool, db, store)


async def ca_arl(args: argparse.Namespace) -> int:
    """Sign the root's CRL (the ARL) again: at least every 12 months (it is valid 365 days), or after a revocation
    whose signing failed."""
    from hapki.cara.main import hsm_pool

    async with _ca_site(args, "cli:ca-arl") as (cfg, db, store, _):
        with hsm_pool(cfg.hsm) as pool:
            return await _sign_arl(pool, db, store)


async def _sign_arl(pool: HSMPool, db: Database, store: MariaDBSigningStore) -> int:
    from cryptography import x509

    from hapki.cara.ca_init import find_root_key, sign_arl
    from hapki.cara.revocation_store import MariaDBRevocationStore
    from hapki.runtime.clock import utcnow

    issuers, default = await store.load_issuers()
    if not issuers:
        print("no issuing CA: run `hapki ca init`", file=sys.stderr)
        return 2
    root_cert = x509.load_pem_x509_certificates(issuers[-1].chain_pem.encode())[-1]
    try:
        root_key = await asyncio.to_thread(find_root_key, pool, root_cert)
    except (ValueError, HapkiError) as exc:
        print(f"the root's CRL is not signed: {exc}; what was revoked is recorded: sign it with `hapki ca arl` "
              "once the root key is reachable", file=sys.stderr)
        return 1

    async def build(number: int, base: int | None, entries: list[Any]) -> tuple[bytes, Any, Any]:
        return await asyncio.to_thread(sign_arl, entries, root_cert=root_cert, root_key=root_key, number=number,
                                       now=utcnow())

    record = await MariaDBRevocationStore(db, actor=store.actor).publish_arl(now=utcnow(), build=build)
    print(f"the root's CRL {record.number} lists {record.entries} revoked issuing CA(s), valid until "
          f"{record.next_update:%Y-%m-%d} (sign it again before: `hapki ca arl`); served at /crl/root.crl")
    return 0


def _hsm_members(cfg: CaraConfig) -> list[HSMMemberConfig]:
    from hapki.runtime.hsm import HSMMemberConfig

    return [
        HSMMemberConfig(name=m.name, module_path=str(m.module_path), token_label=m.token_label,
                        pin_file=m.pin_file, softhsm_conf=m.softhsm_conf)
        for m in cfg.hsm.members
    ]


async def _add_signer(pool: HSMPool, purpose: str, db: Database, store: MariaDBSigningStore,
                      revocations: MariaDBRevocationStore, issuer: IssuerRecord,
                      replicate_across: list[HSMMemberConfig]) -> None:
    """A delegated signer of the issuer ("ocsp": the OCSP responder, "audit": audit checkpoints): key generated in
    the HSM, its certificate's serial reserved (hapki.runtime.delegated_intents), certified by the issuing CA,
    stored with its intent resolved; a certificate that cannot be made abandons the intent."""
    from hapki.cara import issuance
    from hapki.cara.ca_init import create_delegated_signer
    from hapki.cara.ports import OcspSignerRecord
    from hapki.runtime import delegated_intents
    from hapki.runtime.audit import save_audit_signer
    from hapki.runtime.clock import utcnow

    kind = delegated_intents.OCSP_SIGNER if purpose == "ocsp" else delegated_intents.AUDIT_SIGNER
    serial = issuance.random_serial()
    intent_id = await store.reserve_delegated(issuer=issuer.name, serial=format(serial, "x"), purpose=kind,
                                              now=utcnow())
    try:
        signer = await asyncio.to_thread(
            create_delegated_signer, pool, purpose, issuing_cert=issuer.certificate, issuing_key_id=issuer.key_id,
            now=utcnow(), replicate_across=replicate_across, serial=serial,
        )
    except Exception as exc:
        await store.abandon_intent(intent_id, f"the ceremony could not make the certificate: {exc}", utcnow())
        raise
    name, cert = issuer.name, signer.cert
    if purpose == "ocsp":
        await revocations.save_ocsp_signer(
            OcspSignerRecord(issuer=name, cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                             key_id=signer.key_id), not_after=cert.not_valid_after_utc, now=utcnow(),
            intent_id=intent_id)
    else:
        await save_audit_signer(db, issuer=name, cert=cert, key_id=signer.key_id, actor="cli:ca-init", now=utcnow(),
                                intent_id=intent_id)
    print(f"created {purpose} signer for {name!r}: {cert.subject.rfc4514_string()}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")


def clm_keygen(args: argparse.Namespace) -> int:
    """Create CLM's approval key pair: private key for CLM (0600), public key for every CARA member."""
    from hapki.runtime.approval import generate_key_files

    public = args.public or args.out.with_suffix(".pub")
    try:
        key_id = generate_key_files(args.out, public, args.algorithm)
    except FileExistsError:
        print(f"{args.out} exists already; not overwriting a key (remove it first to replace it)", file=sys.stderr)
        return 2
    print(f"created CLM approval key {key_id}: private {args.out} (CLM approval_key_file), public {public} "
          f"(add to approval_public_keys of every CARA member)")
    return 0


class _DatabaseSection(BaseModel):
    model_config = ConfigDict(extra="ignore")
    database: DatabaseConfig


async def db_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations, then the service users' grants (unless --no-grants); 1 if a grant is refused."""
    from hapki.contracts.errors import ProvisioningRefused
    from hapki.runtime import grants
    from hapki.runtime.db import Database
    from hapki.runtime.migrate import migrate

    telemetry.setup_logging()
    config = load_toml(args.config, _DatabaseSection).database
    hosts = dict.fromkeys(grants.SERVICE_USERS, "%")
    try:
        for spec in args.account:
            user, sep, host = spec.partition("@")
            grants.account(user, host if sep else "")  # checked here, before anything runs
            hosts[user] = host
    except ValueError as exc:
        print(f"--account: {exc}", file=sys.stderr)
        return 2
    db = Database(config)
    try:
        applied = await migrate(db)
        print(f"applied migrations: {applied or 'none (up to date)'}")
        if not args.no_grants:
            accounts = {user: [grants.account(user, host)] for user, host in hosts.items()}
            await grants.apply(db, config.database, accounts)
            print(f"granted: {', '.join(a for names in accounts.values() for a in names)} (hapki.runtime.grants)")
    except ProvisioningRefused as exc:
        print(f"grants not applied: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await db.close()
    return 0


async def db(args: argparse.Namespace) -> int:
    return await {"check": db_check, "migrate": db_migrate, "backup": db_backup,
                  "restore": db_restore}[args.db_command](args)


CHECK_TIMEOUT_SECONDS = 600.0  # the checks read whole tables: seconds per million certificates


async def db_check(args: argparse.Namespace) -> int:
    """`hapki db check`: 0 when every invariant holds, 1 naming the violating rows, 2 bad arguments."""
    from hapki.runtime import durability
    from hapki.runtime.db import Database
    from hapki.runtime.invariants import CHECKS, check_all

    if args.settle < 0 or args.rows < 0:
        print("hapki db: --settle and --rows take 0 or more", file=sys.stderr)
        return 2
    telemetry.setup_logging("WARNING")
    database = Database(load_toml(args.config, _DatabaseSection).database)
    try:  # one read-only transaction: every check sees the same snapshot
        found = await database.run(lambda cur: check_all(cur, settle_seconds=args.settle or None),
                                   name="cli.db_check", timeout=CHECK_TIMEOUT_SECONDS)
        nodes = await durability.read_nodes(database)  # each node's settings, on its own connection
    finally:
        await database.close()
    broken = {name: rows for name, rows in found.items() if rows}
    undurable = [n for n in nodes if n.problems]
    if args.json:
        print(json.dumps({"ok": not broken and not undurable, "settle_seconds": args.settle,
                          "invariants": {name: {"meaning": CHECKS[name][0], "violations": [list(map(str, row))
                                                                                           for row in rows]}
                                         for name, rows in found.items()},
                          "durability": {n.node: {"ok": n.ok, "settings": n.settings, "problems": n.problems,
                                                  "error": n.error} for n in nodes}}, indent=2))
    else:
        for name, rows in found.items():
            print(f"{'ok  ' if not rows else 'FAIL'} {name}: {CHECKS[name][0]}"
                  + (f" ({len(rows)} violating rows)" if rows else ""))
            for row in rows[:args.rows]:
                print("       " + " | ".join(map(str, row)))
        for n in nodes:
            state = "?   " if n.error else "ok  " if n.ok else "FAIL"
            print(f"{state} durability of {n.node}: commits survive a power cut of the whole site"
                  + (f" (unknown: {n.error})" if n.error else ""))
            for problem in n.problems:
                print("       " + problem)
    return 1 if broken or undurable else 0


def _operator(command: str) -> str:
    """The audit actor of an operator's command: the command and the OS user who ran it."""
    import getpass

    return f"cli:{command}:{getpass.getuser()}"[:128]


async def db_backup(args: argparse.Namespace) -> int:
    """`hapki db backup`: 0 written (and audited), 1 refused (nothing written), 2 bad arguments."""
    from hapki.runtime import backup
    from hapki.runtime.audit import AuditKind, AuditRecord, append
    from hapki.runtime.clock import utcnow
    from hapki.runtime.db import Database

    if args.out.exists() and not args.force:
        print(f"hapki db backup: {args.out} exists (--force to overwrite it)", file=sys.stderr)
        return 2
    telemetry.setup_logging("WARNING")
    config = load_toml(args.config, _DatabaseSection).database
    db = Database(config)
    try:
        node = await backup.choose_node(db)
        manifest = await asyncio.to_thread(backup.dump, config, node, args.out,
                                           schema=await backup.schema_version(db))
        record = AuditRecord(kind=AuditKind.DATABASE_BACKED_UP, actor=_operator("db-backup"), created_at=utcnow(),
                             detail={"file": args.out.name, "sha256": manifest.sha256, "bytes": manifest.bytes,
                                     "node": node, "schema_version": manifest.schema_version})
        await db.run(lambda cur: append(cur, record, first=backup.record_statement(record.id, manifest, args.out)),
                     name="cli.db_backup")
    except HapkiError as exc:  # BackupRefused, or the database failing (DatabaseError): nothing done
        print(f"hapki db backup: {exc}", file=sys.stderr)
        return 1
    finally:
        await db.close()
    print(f"backup of {config.database} from {node}: {args.out} ({manifest.bytes} bytes, sha256 {manifest.sha256}); "
          f"manifest {backup.manifest_path(args.out)}")
    return 0


async def db_restore(args: argparse.Namespace) -> int:
    """`hapki db restore`: 0 loaded, checked and audited, 1 refused or not intact afterwards, 2 bad arguments."""
    from hapki.contracts.errors import BackupRefused
    from hapki.runtime import backup
    from hapki.runtime.audit import AuditKind, AuditRecord, append
    from hapki.runtime.audit_verify import verify_database
    from hapki.runtime.clock import utcnow
    from hapki.runtime.db import Database
    from datetime import datetime, timedelta

    from hapki.runtime.invariants import check_all

    telemetry.setup_logging("WARNING")
    config = load_toml(args.config, _DatabaseSection).database
    db = Database(config)
    try:
        manifest = await asyncio.to_thread(backup.check, args.backup)
        held = {table: rows for table, rows in (await backup.site_rows(db)).items() if rows}
        if held and not args.replace:
            raise BackupRefused(f"{config.database} holds a site's data ({', '.join(f'{t}: {n} rows' for t, n in held.items())}); "
                                "restore into an empty database, or pass --replace to overwrite it")
        node = await backup.choose_node(db)
        await asyncio.to_thread(backup.restore, config, node, args.backup)
        record = AuditRecord(kind=AuditKind.DATABASE_RESTORED, actor=_operator("db-restore"), created_at=utcnow(),
                             detail={"file": args.backup.name, "sha256": manifest.sha256,
                                     "backed_up_at": manifest.created_at, "from": manifest.node,
                                     "replaced": sorted(held)})
        await db.run(lambda cur: append(cur, record), name="cli.db_restore")
        # What was restored holds together: the invariants and the audit chain up to the backup's head and this
        # entry. Requests and intents in flight when the backup was taken are not lost: the services finish them
        # once they run (the outbox sweep, the next epoch's recovery), so the checks that need a quiet site wait.
        found = await db.run(lambda cur: check_all(cur, quiet=False), name="cli.db_restore_check",
                             timeout=CHECK_TIMEOUT_SECONDS)
        # As of the backup: entries the sealer had not chained yet when it was taken are not late (the sealer
        # chains them once CARA runs here).
        report = await verify_database(db, now=datetime.fromisoformat(manifest.created_at),
                                       grace=timedelta(seconds=60))
        rows = await backup.site_rows(db)
    except HapkiError as exc:  # BackupRefused, or the database failing (DatabaseError): nothing done
        print(f"hapki db restore: {exc}", file=sys.stderr)
        return 1
    finally:
        await db.close()
    broken = {name: len(found_rows) for name, found_rows in found.items() if found_rows}
    print(f"restored {args.backup} (taken {manifest.created_at} from {manifest.node}) into {config.database} on "
          f"{node}: {', '.join(f'{t} {n}' for t, n in rows.items())}")
    print(f"invariants: {'ok' if not broken else f'FAIL {broken}'}; audit: {report.summary()}")
    return 0 if not broken and report.ok else 1


async def audit_verify(args: argparse.Namespace) -> int:
    """Verify the audit chain: 0 intact, 1 broken (the first break named on stderr), 2 bad arguments."""
    from datetime import timedelta

    from hapki.runtime.audit_verify import verify_database
    from hapki.runtime.clock import utcnow
    from hapki.runtime.db import Database

    anchor = None
    if args.anchor:
        seq, _, digest = args.anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            print("--anchor takes SEQ:HASH (64 hex digits), as printed by an earlier verify", file=sys.stderr)
            return 2
        anchor = (int(seq), digest.lower())
    root = None
    if args.root is not None:
        from cryptography import x509

        try:
            root = x509.load_pem_x509_certificate(args.root.read_bytes())
        except (OSError, ValueError) as exc:
            print(f"--root {args.root}: not a PEM certificate ({exc})", file=sys.stderr)
            return 2
    telemetry.setup_logging("WARNING")
    db = Database(load_toml(args.config, _DatabaseSection).database)
    try:
        report = await verify_database(db, now=utcnow(), grace=timedelta(seconds=args.grace), anchor=anchor,
                                       root=root)
    finally:
        await db.close()
    if args.json:
        print(json.dumps({"ok": report.ok, "sealed": report.sealed, "unsealed": report.unsealed,
                          "head": {"seq": report.head_seq, "hash": report.head_hash},
                          "findings": [{"seq": f.seq, "problem": f.problem.value, "entry_id": f.entry_id,
                                        "message": f.message} for f in report.findings]}, indent=2))
    print(report.summary(), file=sys.stdout if report.ok and not args.json else sys.stderr)
    return 0 if report.ok else 1


async def issue(args: argparse.Namespace) -> int:
    from hapki.cli.client import ClmClient, new_key_and_csr
    from hapki.contracts.models import IssueCertificate

    key_pem = None
    if args.csr:
        csr_pem = args.csr.read_bytes()
    else:
        if not args.name:
            print("give --csr FILE or at least one --name", file=sys.stderr)
            return 2
        csr_pem, key_pem = new_key_and_csr(args.name)
    from hapki.runtime.config import NatsConfig

    client = await ClmClient.connect(NatsConfig(servers=args.nats.split(","), user=args.nats_user,
                                                password_file=args.nats_password_file, tls_ca_file=args.nats_ca),
                                     timeout=args.timeout)
    try:
        reply = await client.issue(
            IssueCertificate(csr_pem=csr_pem.decode(), profile=args.profile, requester=args.requester,
                             idempotency_key=args.idempotency_key)
        )
    finally:
        await client.close()
    if reply.error is not None:
        print(f"error {reply.error.code.value}: {reply.error.message} {reply.error.details or ''}", file=sys.stderr)
        return 1
    if reply.certificate_pem is None:
        print(f"request {reply.request_id} is {reply.status.value if reply.status else '?'}; "
              f"ask again with the same --idempotency-key")
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cert.pem").write_text(reply.certificate_pem)
    (args.out / "chain.pem").write_text(reply.chain_pem or "")
    if key_pem:
        key_file = args.out / "key.pem"
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
    print(f"issued serial {reply.serial} (request {reply.request_id}), valid {reply.not_before} .. {reply.not_after}")
    print(f"wrote {args.out / 'cert.pem'} and {args.out / 'chain.pem'}")
    return 0


def docs(args: argparse.Namespace) -> int:
    from hapki.cli.asyncapi import ASYNCAPI_PATH, render

    text = render()
    if args.check:
        current = ASYNCAPI_PATH.read_text() if ASYNCAPI_PATH.exists() else ""
        if current != text:
            print(f"{ASYNCAPI_PATH} is stale: run `hapki docs asyncapi`", file=sys.stderr)
            return 1
        print(f"{ASYNCAPI_PATH} is current")
        return 0
    ASYNCAPI_PATH.write_text(text)
    print(f"wrote {ASYNCAPI_PATH}")
    return 0


def compose(args: argparse.Namespace) -> int:
    from hapki.lab import compose as demo_compose
    from hapki.lab.topology import default

    topo = default()
    if args.compose_command == "render":
        if args.check:
            problems = demo_compose.check(topo, demo_compose.COMPOSE_DIR)
            if problems:
                print("the compose demo is stale: run `hapki compose render`\n  " + "\n  ".join(problems),
                      file=sys.stderr)
                return 1
            print(f"{demo_compose.COMPOSE_DIR} is current")
            return 0
        written = demo_compose.write(topo, demo_compose.COMPOSE_DIR)
        print(f"wrote {len(written)} files under {demo_compose.COMPOSE_DIR}")
        return 0
    from hapki.lab import compose_init

    telemetry.setup_logging()
    if args.compose_command == "init":
        dirs = compose_init.init_secrets(topo, args.secrets, args.hsm, chown=not args.no_chown)
        print(f"secrets ready for {len(dirs)} containers")
        return 0
    compose_init.provision(topo, args.secrets, args.socket, args.cara_config, args.hsm)
    print("provisioned: database users and grants, streams, CA")
    return 0


def demo(args: argparse.Namespace) -> int:
    from hapki.cli.demo import run_demo

    return run_demo(args.dir, keep=args.keep)


def bench(args: argparse.Namespace) -> int:
    if args.signer_processes is not None:
        from hapki.cara.config import SIGNER_PROCESSES_ENV

        if not 1 <= args.signer_processes <= 16:
            print("hapki bench: --signer-processes takes 1 to 16", file=sys.stderr)
            return 2
        os.environ[SIGNER_PROCESSES_ENV] = str(args.signer_processes)  # the stacks' CARA processes inherit it
    if args.compare:
        from hapki.cli import bench_compare

        only = tuple(c for c in args.columns.split(",") if c)
        unknown = set(only) - set(bench_compare.COLUMNS)
        try:
            rates = [int(r) for r in str(args.rate).split(",") if r.strip()]
        except ValueError:
            rates = []
        if (unknown or not rates or min(rates) < 1 or len(set(rates)) != len(rates) or args.vus < 1
                or args.seconds <= 0 or args.warmup <= 0):
            print(f"hapki bench --compare: columns are {','.join(bench_compare.COLUMNS)}; --rate (one or more "
                  "different, comma-separated), --vus, --seconds and --warmup must be positive", file=sys.stderr)
            return 2
        shape = bench_compare.LoadShape(rate=rates[0], vus=args.vus, seconds=args.seconds, warmup=args.warmup,
                                        more_rates=tuple(rates[1:]))
        return bench_compare.run_compare(args.dir, shape, with_lab=args.with_lab, lab_dir=args.lab_dir,
                                         as_json=args.json, only=only)
    if args.growth is not None:
        from hapki.cli import bench_growth

        if args.growth < 1 or args.seconds <= 0:
            print("hapki bench --growth: N and --seconds must be positive", file=sys.stderr)
            return 2
        return bench_growth.run(args.dir, args.growth, seconds=args.seconds, as_json=args.json)
    if args.ocsp is not None or args.crl is not None:
        from hapki.cli import bench_revocation

        try:
            ocsp_levels = [int(x) for x in args.ocsp.split(",") if x] if args.ocsp else None
        except ValueError:
            print("hapki bench: --ocsp takes comma-separated concurrency levels, e.g. 16,64", file=sys.stderr)
            return 2
        if ((ocsp_levels is not None and any(n < 1 for n in ocsp_levels)) or (args.crl is not None and args.crl < 1)
                or (args.ocsp_rate is not None and args.ocsp_rate <= 0)):
            print("hapki bench: concurrency levels and --crl must be positive", file=sys.stderr)
            return 2
        return bench_revocation.run(args.lab_dir, ocsp_levels=ocsp_levels, crl_entries=args.crl,
                                    seconds=args.seconds, as_json=args.json, nonce=args.ocsp_nonce,
                                    rate=args.ocsp_rate)
    from hapki.cli.bench import run_bench

    levels = [int(x) for x in args.concurrency.split(",") if x]
    return run_bench(args.dir, levels=levels, seconds=args.seconds, as_json=args.json)


def lab(args: argparse.Namespace) -> int:
    from hapki.lab.ha import Lab, LabError, format_status, require_root

    try:
        require_root()
    except LabError as exc:
        print(f"hapki lab {args.action}: {exc}", file=sys.stderr)
        return 2
    if args.action == "demo":
        from hapki.cli.lab_demo import run_lab_demo

        return run_lab_demo(args.dir, seconds=args.seconds, rate=args.rate, keep=args.keep)
    telemetry.setup_logging()
    the_lab = Lab(args.dir)
    try:
        if args.action == "up":
            timings = the_lab.up(fresh=args.fresh)
            the_lab.detach()  # the lab outlives this command; `hapki lab down` stops it
            print(f"lab up in {timings['total']:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in timings.items())})")
            print(format_status(the_lab.status()))
        elif args.action == "restart":
            if not args.name:
                print("hapki lab restart: name the process (e.g. clm@clm-2; `hapki lab status` lists them)",
                      file=sys.stderr)
                return 2
            env = _env_changes(args.env)
            if env is None:
                return 2
            took = the_lab.restart(args.name, env)
            the_lab.detach()  # the restarted process outlives this command
            print(f"{args.name} restarted in {took:.1f} s (pid {the_lab.procs.pid(args.name)})")
        elif args.action == "down":
            the_lab.down()
            print(f"lab down: no {the_lab.topo.lab.prefix}-* namespace, host link or lab process left")
        else:
            status = the_lab.status()
            print(json.dumps(status, indent=2) if args.json else format_status(status))
    except LabError as exc:
        print(f"hapki lab {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def _env_changes(pairs: list[str]) -> dict[str, str | None] | None:
    """`--env KEY=VALUE` (KEY= removes KEY) as set_env takes them; None, having said why, if one is malformed."""
    changes: dict[str, str | None] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            print(f"hapki lab restart: --env {pair!r}: KEY=VALUE (KEY= removes it)", file=sys.stderr)
            return None
        changes[key] = value or None
    return changes


def chaos(args: argparse.Namespace) -> int:
    from hapki.cli.chaos import run_chaos
    from hapki.lab.ha import LabError, require_root

    try:
        require_root()
    except LabError as exc:
        print(f"hapki chaos: {exc}", file=sys.stderr)
        return 2
    telemetry.setup_logging("WARNING")
    return run_chaos(args.dir, scenarios=args.scenario, runs=args.runs, rate=args.rate, seconds=args.seconds,
                     as_json=args.json)
