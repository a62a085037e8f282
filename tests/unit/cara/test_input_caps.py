"""Size caps at CARA's edges: the signing consumer and the OCSP routes refuse oversized input unparsed."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.x509 import ocsp

from hapki.cara import http
from hapki.cara.config import SignerConfig
from hapki.cara.ocsp import parse_request
from hapki.cara.signer import Signer
from hapki.cli.fuzz_targets import seeds
from hapki.contracts import subjects
from hapki.contracts.errors import MalformedMessage
from hapki.contracts.limits import MAX_OCSP_GET_CHARS, MAX_OCSP_REQUEST_BYTES, MAX_SIGNING_REQUEST_BYTES

REQUEST_ID = "ab" * 16


class FakeMsg:
    def __init__(self, data: bytes, headers: dict[str, str] | None) -> None:
        self.data, self.headers, self.outcome = data, headers, None

    async def term(self) -> None:
        self.outcome = "term"

    async def ack(self) -> None:
        self.outcome = "ack"

    async def nak(self, delay: float | None = None) -> None:
        self.outcome = "nak"


class FakeNats:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.published.append((subject, data))


def _signer(nc: FakeNats) -> Signer:
    return Signer(nc=nc, js=None, store=None, issuer=SimpleNamespace(name="ca", certificate=None, chain_pem=""),  # type: ignore[arg-type]
                  issuer_key=None, member="cara-1", config=SignerConfig(),  # type: ignore[arg-type]
                  clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
                  approvals=None, profiles={})  # type: ignore[arg-type]  # never reached: the size cap comes first


@pytest.mark.parametrize("msg_id", [REQUEST_ID, None, "not-a-request-id"])
async def test_an_oversized_signing_request_is_terminated_unread(msg_id: str | None,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    nc = FakeNats()
    msg = FakeMsg(b"{" + b" " * MAX_SIGNING_REQUEST_BYTES + b"}", {"Nats-Msg-Id": msg_id} if msg_id else None)
    with caplog.at_level(logging.ERROR, logger="hapki.cara.signer"):
        await _signer(nc).handle(msg)  # type: ignore[arg-type]
    assert msg.outcome == "term"
    assert "oversized signing request terminated unread" in caplog.text
    if msg_id == REQUEST_ID:  # CLM learns it failed, with the size and the limit
        [(subject, data)] = nc.published
        event = json.loads(data)
        assert subject == subjects.CARA_FAILED and event["request_id"] == REQUEST_ID
        assert event["error"]["code"] == "MESSAGE_TOO_LARGE"
        assert event["error"]["details"]["limit"] == MAX_SIGNING_REQUEST_BYTES
    else:  # no request id to name: nothing to tell
        assert nc.published == []


def test_parse_request_refuses_oversized_and_garbage_with_a_typed_error() -> None:
    good = seeds("ocsp")[0]
    assert parse_request(good).serial == 12345
    for bad in (b"", b"\x30\x00", good[:-1], good + b"\x00", b"\x30" * (MAX_OCSP_REQUEST_BYTES + 1)):
        with pytest.raises(MalformedMessage):
            parse_request(bad)


async def _ocsp_client() -> TestClient:
    client = TestClient(TestServer(http.build_app(None)))  # type: ignore[arg-type]
    await client.start_server()
    return client


def _status(body: bytes) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(body).response_status


async def test_ocsp_post_and_get_caps() -> None:
    client = await _ocsp_client()
    try:
        # Within the caps, a request gets an OCSP answer (unauthorized: this app has no responder).
        small = seeds("ocsp")[0]
        response = await client.post("/ocsp", data=small, headers={"Content-Type": "application/ocsp-request"})
        assert _status(await response.read()) is ocsp.OCSPResponseStatus.UNAUTHORIZED
        path = base64.b64encode(small).decode().replace("/", "%2F").replace("+", "%2B").replace("=", "%3D")
        response = await client.get(f"/ocsp/{path}")
        assert _status(await response.read()) is ocsp.OCSPResponseStatus.UNAUTHORIZED
        # Over the caps: malformedRequest, unread.
        response = await client.post("/ocsp", data=b"\x30" * (MAX_OCSP_REQUEST_BYTES + 1))
        assert response.status == 200 and _status(await response.read()) is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        response = await client.get("/ocsp/" + "A" * (MAX_OCSP_GET_CHARS + 4))
        assert response.status == 200 and _status(await response.read()) is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        # A chunked body (no Content-Length) is cut at the cap too.
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"\x30" * 1024

        response = await client.post("/ocsp", data=chunks())
        assert _status(await response.read()) is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    finally:
        await client.close()


def test_a_nonce_over_32_octets_is_malformed_not_echoed() -> None:
    """RFC 8954 2.1: 1 to 32 octets; a longer one would be echoed into a response signed by the CA's responder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp as x509_ocsp

    from hapki.cli.fuzz_targets import _fuzz_ca

    _, cert = _fuzz_ca()
    builder = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, cert, hashes.SHA256())
    for size, ok in ((1, True), (32, True), (33, False), (1024, False)):
        der = builder.add_extension(x509.OCSPNonce(b"n" * size), critical=False).build().public_bytes(
            serialization.Encoding.DER)
        if ok:
            assert parse_request(der).nonce == b"n" * size
        else:
            with pytest.raises(MalformedMessage) as info:
                parse_request(der)
            assert info.value.details == {"field": "nonce", "size": size, "limit": 32}


def test_a_negative_serial_is_malformed() -> None:
    """Found by fuzzing: it parsed, then the response builder raised (internalError, a traceback per request)."""
    der = seeds("ocsp")[0]
    assert der.count(b"\x02\x02\x30\x39") == 1  # INTEGER 12345, the seed's serial
    with pytest.raises(MalformedMessage) as info:
        parse_request(der.replace(b"\x02\x02\x30\x39", b"\x02\x02\xb0\x39"))
    assert info.value.details == {"field": "serial"}
