"""The HTTP edges on real NATS, MariaDB and SoftHSM: CLM's REST API (same contract as NATS) and CARA's /health."""

from __future__ import annotations

import asyncio
import gc
import json
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pymysql
import pytest
from cryptography import x509
from opentelemetry import trace

import hapki
from hapki.cara import http as cara_http
from hapki.cara.main import CaraRuntime
from hapki.cli.client import ClmClient
from hapki.clm import http as clm_http
from hapki.clm.main import ClmRuntime
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode, HapkiError, HSMUnavailable
from hapki.contracts.models import MAX_REQUEST_BYTES, IssueCertificate, IssueReply, RequestStatus
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.db import Database
from hapki.runtime.http import serve
from helpers.csr import csr_der, der_to_pem, make_csr, make_key
from integration.conftest import http_url, running

pytestmark = pytest.mark.integration

LISTEN = "127.0.0.1:0"  # any free port; the runners report the one they got


class Edges:
    """Base URLs of the running CLM and CARA HTTP edges, and the runtimes behind them."""

    def __init__(self, cara: CaraRuntime, clm: ClmRuntime) -> None:
        self.cara, self.clm = cara, clm
        self.clm_url, self.cara_url = http_url(clm.http), http_url(cara.http)


@pytest.fixture(scope="module")
async def edges(env: LocalEnv) -> AsyncIterator[Edges]:
    async with running(stack.cara_config(env, http_listen=LISTEN),
                       stack.clm_config(env, wait_seconds=10.0, http_listen=LISTEN)) as (cara, clm):
        yield Edges(cara, clm)


def _request(names: list[str], profile: str = "tls-server", **kw: Any) -> dict[str, Any]:
    csr_pem, _ = make_csr(names, key=make_key("p256", fresh=True), cn=names[0])
    return IssueCertificate(csr_pem=csr_pem, profile=profile, requester="tests-http", **kw).model_dump(mode="json")


async def _call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    async with http.request(method, url, **kw) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json(), resp.headers


def _assert_error(status: int, body: dict[str, Any], want_status: int, code: ErrorCode) -> None:
    assert status == want_status, body
    assert body["error"]["code"] == code.value, body
    assert set(body["error"]) == {"code", "message", "details"}


# --- issuance and lookups ------------------------------------------------------------------------------------


async def test_rest_issue_returns_the_same_reply_as_nats(edges: Edges, env: LocalEnv, http) -> None:
    body = _request(["rest.example.com", "192.0.2.20"], idempotency_key=f"rest-{uuid.uuid4().hex}")
    status, reply, _ = await _call(http, "POST", f"{edges.clm_url}/v1/issue", json=body)
    assert status == 200, reply
    parsed = IssueReply.model_validate(reply)
    assert parsed.status is RequestStatus.ISSUED and parsed.error is None
    cert = x509.load_pem_x509_certificate(parsed.certificate_pem.encode())
    assert format(cert.serial_number, "x") == parsed.serial
    # The same request again over NATS and over REST (same requester and key): the same JSON from both edges.
    client = await ClmClient.connect(stack.nats_config(env, "client"), timeout=15.0)
    try:
        over_nats = json.loads(await client.raw(subjects.CLM_ISSUE, json.dumps(body).encode()))
    finally:
        await client.close()
    status, over_rest, _ = await _call(http, "POST", f"{edges.clm_url}/v1/issue", json=body)
    assert status == 200
    assert over_rest == over_nats
    assert set(reply) == set(over_nats) and over_nats["serial"] == reply["serial"]


async def test_rest_repeat_with_the_same_key_returns_the_same_certificate(edges: Edges, http) -> None:
    body = _request(["idem-rest.example.com"], idempotency_key=f"idem-{uuid.uuid4().hex}")
    replies = await asyncio.gather(*(_call(http, "POST", f"{edges.clm_url}/v1/issue", json=body) for _ in range(3)))
    first = replies[0][1]
    assert first["serial"]
    for status, reply, _ in replies:
        assert status == 200
        assert (reply["request_id"], reply["serial"], reply["certificate_pem"]) == (
            first["request_id"], first["serial"], first["certificate_pem"])


async def test_rest_request_and_certificate_lookups(edges: Edges, http) -> None:
    _, issued, _ = await _call(http, "POST", f"{edges.clm_url}/v1/issue", json=_request(["look.example.com"]))
    status, by_id, _ = await _call(http, "GET", f"{edges.clm_url}/v1/requests/{issued['request_id']}")
    assert status == 200 and by_id == issued
    status, by_serial, _ = await _call(http, "GET", f"{edges.clm_url}/v1/certificates/{issued['serial']}")
    assert status == 200
    assert (by_serial["request_id"], by_serial["certificate_pem"], by_serial["chain_pem"]) == (
        issued["request_id"], issued["certificate_pem"], issued["chain_pem"])


async def test_clm_health(edges: Edges, http) -> None:
    status, body, _ = await _call(http, "GET", f"{edges.clm_url}/health")
    assert status == 200 and body == {"member": "clm-1", "status": "ok"}


# --- errors: the contract's body, the status from the one table ---------------------------------------------


async def test_garbage_and_wrong_content_are_malformed_message(edges: Edges, http) -> None:
    url = f"{edges.clm_url}/v1/issue"
    headers = {"Content-Type": "application/json"}
    _assert_error(*(await _call(http, "POST", url, data=b"{not json", headers=headers))[:2], 400,
                  ErrorCode.MALFORMED_MESSAGE)
    _assert_error(*(await _call(http, "POST", url, json={"csr_pem": "x"}))[:2], 400, ErrorCode.MALFORMED_MESSAGE)
    _assert_error(*(await _call(http, "POST", url, json=[1, 2]))[:2], 400, ErrorCode.MALFORMED_MESSAGE)
    status, body, _ = await _call(http, "POST", url, data=json.dumps(_request(["a.example.com"])),
                                  headers={"Content-Type": "text/plain"})
    _assert_error(status, body, 400, ErrorCode.MALFORMED_MESSAGE)
    assert "Content-Type" in body["error"]["message"]
    _assert_error(*(await _call(http, "GET", f"{edges.clm_url}/v1/requests/NOT-AN-ID"))[:2], 400,
                  ErrorCode.MALFORMED_MESSAGE)


async def test_oversized_bodies_are_refused_with_message_too_large(edges: Edges, http) -> None:
    url = f"{edges.clm_url}/v1/issue"
    big = b'{"csr_pem": "' + b"A" * MAX_REQUEST_BYTES + b'"}'
    status, body, _ = await _call(http, "POST", url, data=big, headers={"Content-Type": "application/json"})
    _assert_error(status, body, 413, ErrorCode.MESSAGE_TOO_LARGE)
    assert body["error"]["details"] == {"limit": MAX_REQUEST_BYTES, "size": len(big)}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: aiohttp's client_max_size stops the read
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    status, body, _ = await _call(http, "POST", url, data=chunks(), headers={"Content-Type": "application/json"})
    _assert_error(status, body, 413, ErrorCode.MESSAGE_TOO_LARGE)
    assert body["error"]["details"] == {"limit": MAX_REQUEST_BYTES}


async def test_refused_csrs_and_profiles_are_422(edges: Edges, http) -> None:
    url = f"{edges.clm_url}/v1/issue"
    bad = _request(["bad.example.com"]) | {"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}
    _assert_error(*(await _call(http, "POST", url, json=bad))[:2], 422, ErrorCode.MALFORMED_CSR)
    der = bytearray(csr_der(make_csr(["sig.example.com"], key=make_key("p256"))[0]))
    der[-5] ^= 0x01
    broken = _request(["sig.example.com"]) | {"csr_pem": der_to_pem(bytes(der))}
    _assert_error(*(await _call(http, "POST", url, json=broken))[:2], 422, ErrorCode.BAD_CSR_SIGNATURE)
    _assert_error(*(await _call(http, "POST", url, json=_request(["p.example.com"], profile="no-such")))[:2], 422,
                  ErrorCode.UNKNOWN_PROFILE)
    _assert_error(*(await _call(http, "POST", url, json=_request(["www.google.com"])))[:2], 422,
                  ErrorCode.FORBIDDEN_NAME)


async def test_idempotency_conflict_is_409(edges: Edges, http) -> None:
    key = f"conflict-{uuid.uuid4().hex}"
    url = f"{edges.clm_url}/v1/issue"
    status, _, _ = await _call(http, "POST", url, json=_request(["one.example.com"], idempotency_key=key))
    assert status == 200
    _assert_error(*(await _call(http, "POST", url, json=_request(["two.example.com"], idempotency_key=key)))[:2],
                  409, ErrorCode.IDEMPOTENCY_CONFLICT)


async def test_a_refused_request_leaves_nothing_for_the_cycle_collector(edges: Edges, http) -> None:
    """An idempotency conflict is raised from the database's duplicate-key error, through the transaction's retry
    loop and the store: once answered, all of it is freed by reference counting. Before hapki.runtime.edge.release,
    each refusal left its exceptions, frames, cursors and request for the cyclic collector (about 140 objects), which
    the services run rarely: a burst of conflicts piled up megabytes in CLM."""
    key = f"conflict-gc-{uuid.uuid4().hex}"
    url = f"{edges.clm_url}/v1/issue"
    assert (await _call(http, "POST", url, json=_request(["one.example.com"], idempotency_key=key)))[0] == 200
    ours = str(Path(hapki.__file__).parent)
    gc.collect()
    gc.disable()
    try:
        for name in ("two.example.com", "three.example.com"):
            _assert_error(*(await _call(http, "POST", url, json=_request([name], idempotency_key=key)))[:2], 409,
                          ErrorCode.IDEMPOTENCY_CONFLICT)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (HapkiError, pymysql.err.Error))
                or (isinstance(o, types.FrameType) and o.f_code.co_filename.startswith(ours))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


async def test_unknown_ids_routes_and_methods(edges: Edges, http) -> None:
    _assert_error(*(await _call(http, "GET", f"{edges.clm_url}/v1/requests/{uuid.uuid4().hex}"))[:2], 404,
                  ErrorCode.NOT_FOUND)
    _assert_error(*(await _call(http, "GET", f"{edges.clm_url}/v1/certificates/abcdef0123"))[:2], 404,
                  ErrorCode.NOT_FOUND)
    _assert_error(*(await _call(http, "GET", f"{edges.clm_url}/v2/nothing"))[:2], 404, ErrorCode.NOT_FOUND)
    status, body, headers = await _call(http, "GET", f"{edges.clm_url}/v1/issue")
    _assert_error(status, body, 405, ErrorCode.MALFORMED_MESSAGE)
    assert headers["Allow"] == "POST"


class _FailingService:
    """Stands in for ClmService: every call raises what it was given."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def status(self, query: object) -> IssueReply:
        raise self.exc


@pytest.mark.parametrize(("exc", "want", "code"), [
    (HSMUnavailable("no HSM member could sign"), 503, ErrorCode.UNAVAILABLE),
    (RuntimeError("secret internals"), 500, ErrorCode.INTERNAL),
])
async def test_unavailable_and_bugs(exc: Exception, want: int, code: ErrorCode, http) -> None:
    runner = await serve(clm_http.build_app(_FailingService(exc), member="clm-x"), LISTEN)  # type: ignore[arg-type]
    try:
        status, body, headers = await _call(http, "GET", f"{http_url(runner)}/v1/requests/{uuid.uuid4().hex}")
    finally:
        await runner.cleanup()
    _assert_error(status, body, want, code)
    assert "secret" not in json.dumps(body)
    assert ("Retry-After" in headers) is (code is ErrorCode.UNAVAILABLE)


def test_every_error_code_has_an_http_status() -> None:
    assert set(clm_http.STATUS_BY_CODE) == set(ErrorCode)


# --- one trace ----------------------------------------------------------------------------------------------


async def test_rest_issuance_is_one_trace_from_the_callers_traceparent(edges: Edges, http, span_exporter) -> None:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("caller", kind=trace.SpanKind.CLIENT) as caller:
        ctx = caller.get_span_context()
        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
        status, reply, _ = await _call(http, "POST", f"{edges.clm_url}/v1/issue", json=_request(["t.example.com"]),
                                       headers={"traceparent": traceparent})
    assert status == 200, reply
    wanted = {"POST /v1/issue", "clm.issue", "cara.sign", "hsm.sign"}
    for _ in range(100):  # cara.sign ends after it published the result that answered us
        spans = [s for s in span_exporter.get_finished_spans() if s.context.trace_id == ctx.trace_id]
        if wanted <= {s.name for s in spans}:
            break
        await asyncio.sleep(0.05)
    by_name = {s.name: s for s in spans}
    assert wanted <= set(by_name), sorted(by_name)
    server = by_name["POST /v1/issue"]
    assert server.kind is trace.SpanKind.SERVER and server.parent.span_id == ctx.span_id
    assert server.attributes["http.response.status_code"] == 200
    assert by_name["clm.issue"].parent.span_id == server.context.span_id
    assert not any(s.name == "GET /health" for s in span_exporter.get_finished_spans())


# --- CARA ---------------------------------------------------------------------------------------------------


async def test_cara_health_reports_role_epoch_and_dependencies(edges: Edges, http, span_exporter) -> None:
    status, body, _ = await _call(http, "GET", f"{edges.cara_url}/health")
    assert status == 200, body
    assert body == {
        "member": "cara-1", "active": True, "epoch": edges.cara.signer.epoch, "hsm": {"hsm-a": True},
        "database": "ok", "nats": "connected",
    }
    assert isinstance(body["epoch"], int)
    # Health polls leave no traces: no server span, and the database check runs unsampled.
    assert not [s for s in span_exporter.get_finished_spans()
                if s.name == "GET /health" or (s.attributes or {}).get("db.txn") == "health"]


async def test_cara_health_of_a_passive_member_is_200(edges: Edges, http) -> None:
    signer = edges.cara.signer
    await signer.stop()
    try:
        status, body, _ = await _call(http, "GET", f"{edges.cara_url}/health")
        assert status == 200 and body["active"] is False
    finally:
        await signer.start()


async def test_cara_health_without_a_database_is_503(edges: Edges, env: LocalEnv, http) -> None:
    from hapki.lab.local import free_port

    cara = edges.cara
    dead = Database(stack.database_config(env).model_copy(update={"nodes": [f"127.0.0.1:{free_port()}"]}))
    probe = cara_http.HealthProbe(member="cara-x", signer=cara.signer, hsm=cara.hsm, db=dead, nc=cara.nc)
    runner = await serve(cara_http.build_app(probe), LISTEN)
    try:
        status, body, _ = await _call(http, "GET", f"{http_url(runner)}/health")
    finally:
        await runner.cleanup()
        await dead.close()
    assert status == 503 and body["database"] == "unavailable"
    assert (body["nats"], body["hsm"]) == ("connected", {"hsm-a": True})
