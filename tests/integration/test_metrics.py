"""Metrics and `hapki trace` on real service processes: CARA and CLM as `hapki serve` children of a LocalStack.

One issuance; then each service's /metrics (the Prometheus exporter of the real process) must show it with the
right labels, and `hapki trace <request-id>` must print its trace from the span file those processes wrote.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomysql
import pytest

from hapki.cara.config import CaraConfig
from hapki.cli.client import ClmClient
from hapki.clm.config import ClmConfig
from hapki.contracts.models import IssueCertificate
from hapki.lab import stack
from hapki.lab.stack import LocalStack
from hapki.runtime import metrics
from hapki.runtime.config import load_toml
from helpers.csr import make_csr, make_key

pytestmark = pytest.mark.integration

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")


def scrape(listen: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample at http://<listen>/metrics."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(v for n, found, v in samples if n == name and labels.items() <= found.items())


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    base = tmp_path_factory.mktemp("metrics")
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # the children export spans every 0.2 s instead of 5 s
    try:
        with LocalStack(base, trace_file=base / "traces.jsonl") as started:
            yield started
    finally:
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


@pytest.fixture(scope="module")
async def issued(local_stack: LocalStack) -> str:
    """The request id of one certificate issued through the stack."""
    csr_pem, _ = make_csr(["metrics.example.com"], key=make_key("p256"), cn="metrics.example.com")
    client = await ClmClient.connect(stack.nats_config(local_stack.env, "client"), timeout=15.0)
    try:
        reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests"))
    finally:
        await client.close()
    assert reply.error is None and reply.request_id is not None
    return reply.request_id


def _listen(local_stack: LocalStack, service: str) -> str:
    model = {"cara": CaraConfig, "clm": ClmConfig}[service]
    listen = load_toml(local_stack.base_dir / "config" / f"{service}.toml", model).metrics.listen  # type: ignore[attr-defined]
    assert listen is not None
    return str(listen)


async def test_clm_counts_the_issuance_by_profile_and_outcome(local_stack: LocalStack, issued: str) -> None:
    samples = scrape(_listen(local_stack, "clm"))
    labels = {"pki_profile": "tls-server", "pki_outcome": "issued", "pki_member": "clm-1", "pki_error": ""}
    assert value(samples, "hapki_clm_issuance_total", **labels) == 1
    assert value(samples, "hapki_clm_issuance_total", pki_outcome="failed") == 0
    timed = {"pki_profile": "tls-server", "pki_outcome": "issued"}
    assert value(samples, "hapki_clm_issuance_duration_seconds_count", **timed) == 1
    assert 0 < value(samples, "hapki_clm_issuance_duration_seconds_sum", **timed) < 10
    # The database node as CLM sees it (sampled at start; the single-host MariaDB is not Galera).
    assert value(samples, "hapki_db_node_up", pki_member="clm-1") == 1


async def test_cara_exports_signer_hsm_queue_and_crl(local_stack: LocalStack, issued: str) -> None:
    listen = _listen(local_stack, "cara")
    deadline = time.monotonic() + 10
    while True:  # the queue sample and the first CRLs follow the start by up to a sample interval
        samples = scrape(listen)
        if value(samples, "hapki_crl_number", crl_kind="delta") and [n for n, _, _ in samples
                                                                     if n == "hapki_signing_queue_pending"]:
            break
        assert time.monotonic() < deadline, sorted({n for n, _, _ in samples})
        time.sleep(0.3)
    assert value(samples, "hapki_cara_signer_active", pki_member="cara-1") == 1
    assert value(samples, "hapki_cara_signer_epoch", pki_member="cara-1") >= 1
    assert value(samples, "hapki_hsm_member_up", hsm_member="hsm-a") == 1
    assert value(samples, "hapki_hsm_sign_duration_seconds_count", hsm_member="hsm-a", pki_outcome="ok") >= 1
    assert value(samples, "hapki_signing_queue_pending", pki_member="cara-1") == 0
    assert value(samples, "hapki_crl_size_bytes", crl_kind="full") > 0
    assert value(samples, "hapki_db_node_up", pki_member="cara-1") == 1
    assert value(samples, "hapki_process_starts", pki_service="cara") == 1  # no supervisor here: the first start
    # The certificates it signs under, in seconds left: the OCSP responder's fresh (90 days), the issuing CA's ~10 y.
    days_left = {certificate: value(samples, "hapki_ca_certificate_remaining_seconds", pki_member="cara-1",
                                    pki_certificate=certificate) / 86400 for certificate in ("ocsp_signer", "issuing_ca")}
    assert 89 < days_left["ocsp_signer"] <= 90 and 3600 < days_left["issuing_ca"] <= 3660, days_left
    # `hapki ca init` signed the root's first CRL (the ARL), valid a year.
    assert 364 < value(samples, "hapki_ca_arl_remaining_seconds", pki_member="cara-1") / 86400 <= 365
    # Every name the real process exports is one the catalog predicts (the dashboards are checked against those).
    exported = {n for n, _, _ in samples if n.startswith("hapki_")}
    assert exported <= metrics.exported_names(), exported - metrics.exported_names()


def _wait_for(listen: str, done: Callable[[list[tuple[str, dict[str, str], float]]], bool],
              seconds: float) -> list[tuple[str, dict[str, str], float]]:
    """Scrape until `done(samples)` (sampled figures follow within a sample interval, 5 s); the last samples."""
    deadline = time.monotonic() + seconds
    while not done(samples := scrape(listen)):
        assert time.monotonic() < deadline, [s for s in samples if "intents" in s[0]]
        time.sleep(0.3)
    return samples


async def test_cara_counts_and_ages_an_intent_left_reserved(local_stack: LocalStack, issued: str) -> None:
    """A signature nobody accounted for (its signer died between C_Sign and the store) shows in the metrics the
    alert HapkiSigningIntentUnresolved reads, and goes when the intent is resolved."""
    listen = _listen(local_stack, "cara")
    reserved = "hapki_signing_intents_reserved"
    age = "hapki_signing_intents_oldest_reserved_age_seconds"
    _wait_for(listen, lambda s: any(n == reserved for n, _, _ in s), 15)
    samples = scrape(listen)
    assert value(samples, reserved, pki_member="cara-1") == 0 and value(samples, age, pki_member="cara-1") == 0
    intent = uuid.uuid4().hex
    conn = await aiomysql.connect(**local_stack.env.db.connect_kwargs(), autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO signing_intents (id, request_id, issuer, serial, epoch, member, state, created_at)"
                " SELECT %s, %s, issuer, %s, epoch, member, 'reserved', UTC_TIMESTAMP(6) - INTERVAL 10 MINUTE"
                " FROM signing_intents WHERE request_id = %s",
                (intent, uuid.uuid4().hex, secrets.token_hex(19), issued))
        samples = _wait_for(listen, lambda s: value(s, reserved, pki_member="cara-1") == 1, 15)
        assert 600 <= value(samples, age, pki_member="cara-1") < 700
        async with conn.cursor() as cur:  # resolved, as a new epoch or the request's next attempt would
            await cur.execute("UPDATE signing_intents SET state = 'abandoned', resolved_at = UTC_TIMESTAMP(6),"
                              " resolution = 'test' WHERE id = %s", (intent,))
        samples = _wait_for(listen, lambda s: value(s, reserved, pki_member="cara-1") == 0, 15)
        assert value(samples, age, pki_member="cara-1") == 0
    finally:
        async with conn.cursor() as cur:
            await cur.execute("DELETE FROM signing_intents WHERE id = %s", (intent,))
        conn.close()


def test_hapki_trace_prints_the_issuance_as_a_tree(local_stack: LocalStack, issued: str) -> None:
    assert local_stack.trace_file is not None
    result = subprocess.run(
        [*stack.hapki_command(), "trace", issued, "--file", str(local_stack.trace_file), "--wait", "10"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("trace ") and lines[0].endswith(f"of request {issued}")
    names = [line.split()[0] for line in lines[2:]]
    assert {"clm.issue", "clm.validate", "bus.publish", "cara.sign", "hsm.sign", "db.commit"} <= set(names)
    by_name = {line.split()[0]: line for line in lines[2:]}
    indent = {name: len(line) - len(line.lstrip()) for name, line in by_name.items()}
    assert indent["cara.sign"] > indent["bus.publish"] > indent["clm.issue"]  # a tree: CLM -> bus -> CARA
    assert indent["hsm.sign"] > indent["cara.sign"]
    assert re.search(r"\d+\.\d\d ms +\+\d+\.\d\d ms", by_name["hsm.sign"])  # took, started


def test_hapki_trace_of_an_unknown_request_fails(local_stack: LocalStack) -> None:
    assert local_stack.trace_file is not None
    result = subprocess.run([*stack.hapki_command(), "trace", "0" * 32, "--file", str(local_stack.trace_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no span names request" in result.stderr


async def test_node_status_reads_the_node_and_leaves_the_session_as_configured(local_stack: LocalStack) -> None:
    from hapki.runtime.db import Database

    for sync_wait in (False, True):
        db = Database(stack.database_config(local_stack.env, sync_wait=sync_wait))
        try:
            assert await db.node_status(db.nodes[0]) == {}  # the single-host MariaDB runs without Galera
            assert await db.primary_status(timeout=2.0) == "primary"  # the shared status connection still works
        finally:
            await db.close()


async def test_replies_are_one_destination_in_the_bus_metrics(local_stack: LocalStack, issued: str) -> None:
    """Every NATS request has a reply subject of its own; as a label of FastStream's publish metrics it made a time
    series per request (2,000 per instrument, the SDK's limit; in the lab 38,000 lines per scrape and +100 MiB of
    CLM). All replies are counted under one destination, and more issuances of the same kind add no series to
    either service's /metrics (no label may take a value per request). Runs last in this module: it issues more."""

    def series(service: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        # The CRL series appear on their own schedule (the first full and delta CRLs after the start), not per request.
        return {(name, tuple(sorted(labels.items()))) for name, labels, _ in scrape(_listen(local_stack, service))
                if not name.startswith("hapki_crl_")}

    before = {service: series(service) for service in ("clm", "cara")}
    client = await ClmClient.connect(stack.nats_config(local_stack.env, "client"), timeout=15.0)
    try:
        for i in range(3):
            csr_pem, _ = make_csr([f"reply-{i}.example.com"], key=make_key("p256"), cn=f"reply-{i}.example.com")
            reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests"))
            assert reply.error is None
    finally:
        await client.close()
    samples = scrape(_listen(local_stack, "clm"))
    published = {labels["messaging_destination_name"] for name, labels, _ in samples
                 if name == "messaging_publish_duration_seconds_count"}
    assert published and not [d for d in published if d.startswith(("_INBOX.", "_R_."))], published
    # The module's first issuance and these three, each answered once.
    assert value(samples, "messaging_publish_duration_seconds_count", messaging_destination_name="(reply)") == 4
    for service, seen in before.items():
        assert series(service) - seen == set(), service
