"""The CLM NATS edge: FastStream subscribers for the API subjects (the CA's result events: hapki.clm.results).

Every reply is a contract model; any failure becomes a structured error reply (never a silent timeout).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from faststream.middlewares import BaseMiddleware, ExceptionMiddleware
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry.provider import NatsTelemetrySettingsProvider, telemetry_attributes_provider_factory
from faststream.nats.response import NatsPublishCommand
from faststream.opentelemetry import TelemetrySettingsProvider
from faststream.opentelemetry.middleware import TelemetryMiddleware
from faststream.response import PublishType
from pydantic import ValidationError

from hapki.clm.ratelimit import caller
from hapki.clm.service import ClmService
from hapki.contracts import subjects
from hapki.contracts.errors import HapkiError, MessageTooLarge
from hapki.contracts.limits import MAX_REQUEST_BYTES
from hapki.contracts.models import (
    CertificateQuery,
    CertificateReply,
    IssueCertificate,
    IssueReply,
    RenewCertificate,
    RevokeCertificate,
    RevokeReply,
    SearchCertificates,
    SearchReply,
    StatusQuery,
)
from hapki.runtime.bus_auth import REQUEST_INFO_HEADER
from hapki.runtime.edge import error_reply

log = logging.getLogger("hapki.clm.app")
ISSUE_WORKERS = 4096  # concurrent issue (and renew) handlers per CLM process; see build_broker
# The destination every reply is counted and named under in FastStream's telemetry (see _ReplyAsOneDestination).
REPLY_DESTINATION = "(reply)"


class _ReplyAsOneDestination(NatsTelemetrySettingsProvider):
    """FastStream's NATS telemetry, with every reply under one destination name in its metrics and span names.

    A request's reply goes to the client's own inbox subject, a new one per request (`_INBOX.<random>`), and
    FastStream labels its publish metrics with the destination: a time series per request, up to the SDK's limit
    of 2,000 per instrument. In the lab that was 38,000 lines on every scrape of CLM's /metrics and about 100 MiB
    more of CLM's memory after a few thousand NATS requests (docs/PERFORMANCE.md, "NATS clients"). The span
    attributes keep the inbox (`messaging.destination.name`), for one trace at a time.
    """

    __slots__ = ()

    def get_publish_destination_name(self, cmd: NatsPublishCommand) -> str:  # type: ignore[override]
        return REPLY_DESTINATION if cmd.publish_type is PublishType.REPLY else cmd.destination


def _telemetry_settings(msg: object) -> TelemetrySettingsProvider[Any] | None:
    provider = telemetry_attributes_provider_factory(msg)  # type: ignore[arg-type]
    return _ReplyAsOneDestination() if type(provider) is NatsTelemetrySettingsProvider else provider


def telemetry_middleware() -> TelemetryMiddleware[NatsPublishCommand]:
    """FastStream's NatsTelemetryMiddleware, but with replies as one destination (_ReplyAsOneDestination)."""
    return TelemetryMiddleware(settings_provider_factory=_telemetry_settings, include_messages_counters=True)


class SizeLimit(BaseMiddleware):
    """Refuse an oversized request before anything parses it: MESSAGE_TOO_LARGE.

    Broker-wide, so every subscriber has it, present and future.
    """

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        limit, size = MAX_REQUEST_BYTES, len(msg.body)
        if size > limit:
            raise MessageTooLarge(f"request is {size} bytes; the limit is {limit}", {"size": size, "limit": limit})
        return await call_next(msg)


def bus_caller(headers: Mapping[str, str] | None) -> str | None:
    """``bus:<user>`` of a client request, from the header nats-server sets when it crosses the clients' import.

    The server replaces any such header a client sends (hapki.runtime.bus_auth.accounts_conf), so the user is
    the authenticated one. None when there is no header: the message was published inside the services' account,
    where only the admin may call the CLM API.
    """
    raw = (headers or {}).get(REQUEST_INFO_HEADER)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    user = info.get("user") if isinstance(info, dict) else None
    # Without a user (an import without share; or written by the admin inside the services' account): one bucket
    # for the whole account it names, never the self-declared requester.
    if isinstance(user, str) and user:
        return f"bus:{user}"
    account = info.get("acc") if isinstance(info, dict) else None
    return f"bus-account:{account if isinstance(account, str) else '?'}"


class CallerIdentity(BaseMiddleware):
    """Who asks, for the rate limits: the authenticated bus user (bus_caller) for the handler's duration."""

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        with caller(bus_caller(msg.headers)):
            return await call_next(msg)


def _errors() -> ExceptionMiddleware:
    middleware = ExceptionMiddleware()

    @middleware.add_handler(ValidationError, publish=True)
    async def on_validation(exc: ValidationError) -> dict[str, Any]:
        return error_reply(exc)

    @middleware.add_handler(HapkiError, publish=True)
    async def on_hapki(exc: HapkiError) -> dict[str, Any]:
        return error_reply(exc)

    @middleware.add_handler(Exception, publish=True)
    async def on_bug(exc: Exception) -> dict[str, Any]:
        return error_reply(exc)

    return middleware


def build_broker(servers: list[str] | str, service: ClmService | None, **options: Any) -> NatsBroker:
    """The FastStream broker with CLM's subscribers bound to `service` (None: for the AsyncAPI document only)."""
    broker = NatsBroker(
        servers,
        middlewares=[telemetry_middleware(), _errors(), SizeLimit, CallerIdentity],
        description="hapki CLM: certificate requests (RA) and CA result events",
        **options,
    )

    def svc() -> ClmService:
        assert service is not None, "broker built for documentation only"
        return service

    # Issue and renew take a handler each for as long as the CA needs (up to wait_seconds): while the database
    # or the CA stalls, 100 requests/s with client retries need far more than a few hundred. A message beyond the
    # limit waits in the subscription, first in first out, and is handled after its client gave up, behind other
    # stale ones, which is what made clients wait 20 s after a 6 s Galera stall. Retries of a request in
    # progress cost no database work here (ClmService joins them), so the limit is high.
    @broker.subscriber(subjects.CLM_ISSUE, queue="clm", max_workers=ISSUE_WORKERS, title="IssueCertificate")
    async def issue(body: IssueCertificate) -> IssueReply:
        """Issue a certificate for a CSR under a profile; idempotent by (requester, idempotency_key)."""
        return await svc().issue(body)

    @broker.subscriber(subjects.CLM_STATUS, queue="clm", max_workers=64, title="RequestStatus")
    async def status(body: StatusQuery) -> IssueReply:
        """The state of one request, with its certificate once issued."""
        return await svc().status(body)

    @broker.subscriber(subjects.CLM_CERTIFICATE, queue="clm", max_workers=64, title="GetCertificate")
    async def certificate(body: CertificateQuery) -> CertificateReply:
        """One certificate by serial."""
        return await svc().certificate(body)

    @broker.subscriber(subjects.CLM_REVOKE, queue="clm", max_workers=64, title="RevokeCertificate")
    async def revoke(body: RevokeCertificate) -> RevokeReply:
        """Revoke a certificate by serial with an RFC 5280 reason; idempotent by (serial, reason)."""
        return await svc().revoke(body)

    @broker.subscriber(subjects.CLM_SEARCH, queue="clm", max_workers=64, title="SearchCertificates")
    async def search(body: SearchCertificates) -> SearchReply:
        """Issued certificates by serial, subject, SAN, requester, profile, status, expiry; keyset-paged."""
        return await svc().search(body)

    @broker.subscriber(subjects.CLM_RENEW, queue="clm", max_workers=ISSUE_WORKERS, title="RenewCertificate")
    async def renew(body: RenewCertificate) -> IssueReply:
        """A new certificate for the same names from a new CSR, linked to its predecessor; idempotent like issue."""
        return await svc().renew(body)

    return broker
