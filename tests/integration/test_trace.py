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
    assert {"clm.record", "cara.reserve", "cara.record_issued"} <= set(txns)
    assert "cara.sign" in _ancestors(txns["cara.record_issued"], by_id)
    # The intent commit happens before the HSM signs; the certificate commit after.
    assert txns["cara.reserve"].end_time <= hsm.start_time <= hsm.end_time <= txns["cara.record_issued"].start_time
