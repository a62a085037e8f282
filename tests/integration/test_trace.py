"""One issuance is one trace: client -> CLM -> bus -> CARA -> HSM sign -> DB commit -> reply."""

from __future__ import annotations

import asyncio

import pytest

from hapki.contracts.models import IssueCertificate
from helpers.csr import make_csr, make_key

pytestmark = pytest.mark.integration


def _ancestors(span, by_id) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_issuance_is_one_trace_from_client_to_hsm_and_db(client, span_exporter) -> None:
    csr_pem, _ = make_csr(["trace.example.com"], key=make_key("p256"), cn="trace.example.com")
    reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests"))
    assert reply.error is None
    await asyncio.sleep(0.2)  # the signer finishes its span after publishing the result
    spans = span_exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "client.issue")
    trace_id = root.context.trace_id
    mine = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in mine}
    names = {s.name for s in mine}
    assert {"clm.issue", "clm.validate", "bus.publish", "cara.sign", "hsm.sign", "db.commit"} <= names

    cara = next(s for s in mine if s.name == "cara.sign")
    assert cara.attributes["pki.request_id"] == reply.request_id
    assert cara.attributes["pki.serial"] == reply.serial
    assert {"bus.publish", "clm.issue", "client.issue"} <= set(_ancestors(cara, by_id))
    hsm = next(s for s in mine if s.name == "hsm.sign")
    assert "cara.sign" in _ancestors(hsm, by_id)
    txns = {s.attributes.get("db.txn"): s for s in mine if s.name == "db.commit"}
    assert {"clm.record", "cara.reserve_fresh", "cara.record_issued"} <= set(txns)
    assert "cara.sign" in _ancestors(txns["cara.record_issued"], by_id)
    # The intent commit happens before the HSM signs; the certificate commit after.
    reserve, store = txns["cara.reserve_fresh"], txns["cara.record_issued"]
    assert reserve.end_time <= hsm.start_time <= hsm.end_time <= store.start_time


async def test_an_unsampled_request_is_issued_alike_and_records_no_span(client, span_exporter, tmp_path) -> None:
    """A caller's traceparent that says "not sampled" (what PRODUCTION_SAMPLER makes of 99% of the requests) is
    followed by CLM and CARA: the certificate is the same as ever, and no service records a span of that trace."""
    from cryptography import x509
    from opentelemetry import trace

    from integration.conftest import chain_files

    dropped = trace.NonRecordingSpan(trace.SpanContext(
        trace_id=0x5A5A << 64 | 0x1234, span_id=0x77, is_remote=True, trace_flags=trace.TraceFlags(0)))
    csr_pem, _ = make_csr(["unsampled.example.com"], key=make_key("p256", fresh=True), cn="unsampled.example.com")
    with trace.use_span(dropped):
        reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests"))
    assert reply.error is None and reply.certificate_pem
    leaf, inter, _root = chain_files(tmp_path, reply.certificate_pem, reply.chain_pem)
    cert = x509.load_pem_x509_certificate(leaf.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(inter.read_bytes()))
    assert format(cert.serial_number, "x") == reply.serial
    await asyncio.sleep(0.2)  # as above: the signer ends its spans after publishing
    traced = [s.name for s in span_exporter.get_finished_spans() if s.context.trace_id == 0x5A5A << 64 | 0x1234]
    assert traced == []


async def test_the_result_event_is_consumed_without_a_span_of_its_own(client, span_exporter) -> None:
    """CLM traces its API requests (FastStream's consumer span) but not CARA's result events (hapki.clm.app)."""
    from hapki.contracts import subjects

    csr_pem, _ = make_csr(["event.example.com"], key=make_key("p256", fresh=True), cn="event.example.com")
    reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester="tests"))
    assert reply.error is None
    await asyncio.sleep(0.2)
    spans = span_exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "client.issue")
    names = {s.name for s in spans if s.context.trace_id == root.context.trace_id}
    assert f"{subjects.CLM_ISSUE} process" in names and "clm.issue" in names
    assert not any(name.startswith((subjects.CARA_ISSUED, subjects.CARA_FAILED)) for name in names), names
