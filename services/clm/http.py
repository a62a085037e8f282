"""The CLM REST edge: the NATS API over HTTP (aiohttp), for clients behind haproxy on the CLM floating IP.

Same contract models as JSON bodies, same ClmService methods as the NATS edge in app.py. Errors are the
contract's `{"error": {...}}` bodies from hapki.runtime.edge; only the HTTP status is decided here, from the
error code, in STATUS_BY_CODE.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace
from pydantic import BaseModel

from hapki.clm.service import ClmService
from hapki.clm.ratelimit import caller, retry_after_header
from hapki.contracts.errors import ErrorCode, MalformedMessage, MessageTooLarge, NotFound, RateLimited
from hapki.contracts.models import (
    MAX_REQUEST_BYTES,
    CertificateQuery,
    IssueCertificate,
    IssueReply,
    RenewCertificate,
    RequestStatus,
    RevokeCertificate,
    SearchCertificates,
    StatusQuery,
)
from hapki.runtime.edge import error_reply

log = logging.getLogger("hapki.clm.http")
tracer = trace.get_tracer("hapki.clm.http")

# HTTP status of a reply carrying an error, by its code. Syntax and schema failures are 400; a well-formed
# request whose content policy refuses (CSR, key, names, profile) is 422 (RFC 9110 15.5.21: syntax right,
# instructions not processable), so a client tells "my code is broken" from "this request is not allowed".
# FORBIDDEN_NAME is not 403 (the caller is not unauthorised; authentication will own 401/403) and
# UNKNOWN_PROFILE is not 404 (the resource /v1/issue exists).
STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.MALFORMED_MESSAGE: 400,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.MALFORMED_CSR: 422,
    ErrorCode.BAD_CSR_SIGNATURE: 422,
    ErrorCode.KEY_POLICY_VIOLATION: 422,
    ErrorCode.INVALID_NAME: 422,
    ErrorCode.FORBIDDEN_NAME: 422,
    ErrorCode.UNKNOWN_PROFILE: 422,
    ErrorCode.IDEMPOTENCY_CONFLICT: 409,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.SIGNING_REJECTED: 422,
    ErrorCode.INTERNAL: 500,
    ErrorCode.ALREADY_REVOKED: 409,  # conflicts with the stored state (revoked with another reason)
    ErrorCode.FORBIDDEN_REASON: 422,  # a well-formed reason this CA's policy refuses
    ErrorCode.INVALID_CURSOR: 400,  # the client sent back something this service did not give it
    ErrorCode.NOT_RENEWABLE: 409,  # conflicts with the stored state (the predecessor is revoked)
    ErrorCode.REQUESTER_MISMATCH: 403,  # the one refusal about who asks, not what (until authentication owns 403)
    ErrorCode.NAMES_MISMATCH: 422,  # a well-formed CSR whose names are not the predecessor's
    ErrorCode.RATE_LIMITED: 429,  # RFC 6585 4, with Retry-After from the requester's bucket
    ErrorCode.APPROVAL_INVALID: 422,  # the CA refused to sign (a request queued before approvals existed)
    ErrorCode.POLICY_VIOLATION: 422,  # the CA's own profile check refused what CLM approved
}
# Sent with 503: CLM's own retries (database failover, outbox sweep) usually settle within a second or two.
RETRY_AFTER_SECONDS = 1
JSON_TYPES = ("application/json",)
# Routes not traced: haproxy polls them every few seconds.
UNTRACED = frozenset({"/health"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_caller(request: web.Request, trusted_proxies: frozenset[str]) -> str:
    """``addr:<ip>`` of the client: the last X-Forwarded-For address when the peer is a trusted proxy (haproxy
    sets it to the address it accepted the connection from), else the peer's own address."""
    peer = request.remote or "?"
    if peer in trusted_proxies:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        if forwarded:
            try:
                return f"addr:{ipaddress.ip_address(forwarded[-1].split(',')[-1].strip())}"
            except ValueError:
                log.warning("X-Forwarded-For from %s is not an address; keying on the proxy", peer)
    return f"addr:{peer}"


def build_app(service: ClmService, *, member: str,
              trusted_proxies: Iterable[str] = ("127.0.0.1", "::1")) -> web.Application:
    """The aiohttp application with CLM's routes bound to `service`; rate limits per client address (see
    http_caller; `trusted_proxies`: ClmConfig.trusted_proxies)."""
    trusted = frozenset(trusted_proxies)

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        with caller(http_caller(request, trusted)):
            return await handler(request)

    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_edge, identify])

    async def issue(request: web.Request) -> web.Response:
        """POST /v1/issue: IssueCertificate -> IssueReply (200 issued, 202 pending, the error's status if failed)."""
        return _issue_reply(await service.issue(IssueCertificate.model_validate_json(await _read_json(request))))

    async def renew(request: web.Request) -> web.Response:
        """POST /v1/certificates/{serial}/renew: RenewCertificate without `serial` (the path names it) -> as issue."""
        body = _json_object(await _read_json(request))
        if "serial" in body:
            raise MalformedMessage("serial: give it in the path only", {"field": "serial"})
        return _issue_reply(await service.renew(RenewCertificate.model_validate(
            {**body, "serial": request.match_info["serial"]})))

    async def search(request: web.Request) -> web.Response:
        """GET /v1/certificates?serial=&subject=&san=&requester=&profile=&status=&expiring_before=&cursor=&limit=:
        SearchReply, 200 (an empty page too). Unknown or repeated parameters are refused."""
        repeated = sorted({k for k in request.query.keys() if len(request.query.getall(k)) > 1})
        if repeated:
            raise MalformedMessage(f"query parameter given more than once: {', '.join(repeated)}",
                                   {"field": repeated[0]})
        return _reply(await service.search(SearchCertificates.model_validate(dict(request.query))), 200)

    async def status(request: web.Request) -> web.Response:
        """GET /v1/requests/{request_id}: IssueReply, 200 whatever the request's state (a failed one included)."""
        return _reply(await service.status(StatusQuery(request_id=request.match_info["request_id"])), 200)

    async def certificate(request: web.Request) -> web.Response:
        """GET /v1/certificates/{serial}: CertificateReply."""
        return _reply(await service.certificate(CertificateQuery(serial=request.match_info["serial"])), 200)

    async def revoke(request: web.Request) -> web.Response:
        """POST /v1/revoke: RevokeCertificate -> RevokeReply, 200 (a repeat with the same reason too)."""
        return _reply(await service.revoke(RevokeCertificate.model_validate_json(await _read_json(request))), 200)

    async def health(request: web.Request) -> web.Response:
        """GET /health: this member's process answers (haproxy's liveness check)."""
        return web.json_response({"member": member, "status": "ok"})

    app.router.add_post("/v1/issue", issue)
    app.router.add_get("/v1/requests/{request_id}", status)
    app.router.add_get("/v1/certificates", search)
    app.router.add_get("/v1/certificates/{serial}", certificate)
    app.router.add_post("/v1/certificates/{serial}/renew", renew)
    app.router.add_post("/v1/revoke", revoke)
    app.router.add_get("/health", health)
    return app


@web.middleware
async def _edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One server span per request (parent from the W3C traceparent header) and the error mapping."""
    if request.path in UNTRACED:
        return await _respond(request, handler)
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "(unmatched)"
    with tracer.start_as_current_span(
        f"{request.method} {template}", context=propagate.extract(request.headers), kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": template, "url.path": request.path},
    ) as span:
        response = await _respond(request, handler)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(trace.StatusCode.ERROR, f"HTTP {response.status}")
        return response


async def _respond(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # aiohttp's own refusals (no such route, wrong method): the contract's body, aiohttp's status and headers.
        refused = NotFound(f"no route {request.path}") if exc.status == 404 else MalformedMessage(
            f"{request.method} {request.path}: {exc.reason}")
        return web.json_response(error_reply(refused), status=exc.status, headers=_allow(exc))
    except Exception as exc:  # every other failure: the one mapping in hapki.runtime.edge
        body = error_reply(exc)
        code = ErrorCode(body["error"]["code"])
        headers = _retry_after(exc, code)
        trace.get_current_span().set_attribute("pki.error_code", code.value)
        return web.json_response(body, status=STATUS_BY_CODE[code], headers=headers)


async def _read_json(request: web.Request) -> bytes:
    """The raw JSON body, refused unread when over MAX_REQUEST_BYTES or not declared as JSON."""
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise _too_large(request.content_length)
    if request.content_type not in JSON_TYPES:
        raise MalformedMessage(f"Content-Type must be application/json, not {request.content_type}",
                               {"content_type": request.content_type})
    try:
        return await request.read()  # aiohttp stops at client_max_size (chunked bodies have no length up front)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None) from None


def _json_object(raw: bytes) -> dict[str, Any]:
    """A JSON body that must be an object, or MalformedMessage."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"body is not JSON: {exc}", {"field": "body"}) from None
    if not isinstance(body, dict):
        raise MalformedMessage("body must be a JSON object", {"field": "body"})
    return body


def _issue_reply(reply: IssueReply) -> web.Response:
    """An IssueReply's HTTP status: 200 issued, 202 pending (Location: the request), the error's status if failed."""
    if reply.error is not None:
        return _reply(reply, STATUS_BY_CODE[reply.error.code])
    if reply.status is RequestStatus.PENDING:
        return _reply(reply, 202, headers={"Location": f"/v1/requests/{reply.request_id}"})
    return _reply(reply, 200)


def _too_large(size: int | None) -> MessageTooLarge:
    shown = f"{size} bytes" if size is not None else "larger than the limit"
    details: dict[str, Any] = {"limit": MAX_REQUEST_BYTES} | ({"size": size} if size is not None else {})
    return MessageTooLarge(f"request is {shown}; the limit is {MAX_REQUEST_BYTES}", details)


def _reply(model: BaseModel, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json",
                        headers=headers)


def _retry_after(exc: Exception, code: ErrorCode) -> dict[str, str] | None:
    """Retry-After for the refusals a later retry can pass: 503 (a fixed second) and 429 (the bucket's wait)."""
    if isinstance(exc, RateLimited):
        return {"Retry-After": retry_after_header(exc.retry_after)}
    if code is ErrorCode.UNAVAILABLE:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return None


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    return {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None

