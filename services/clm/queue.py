"""JetStream adapters of CLM's SigningQueue and ExpiryPublisher (Nats-Msg-Id de-duplication, trace context in
headers), and the core NATS event publisher."""

from __future__ import annotations

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from opentelemetry import trace

from hapki.clm.ports import ExpiryNotice
from hapki.contracts import subjects
from hapki.contracts.errors import Unavailable
from hapki.contracts.models import CertificateRevoked, SignCertificate
from hapki.runtime import telemetry

tracer = trace.get_tracer("hapki.clm")


async def _publish(js: JetStreamContext, subject: str, data: bytes, msg_id: str, timeout: float,
                   what: str) -> None:
    """Publish into a stream and wait for its ack; the stream drops a second message with the same msg_id."""
    with telemetry.span(tracer, "bus.publish", kind=trace.SpanKind.PRODUCER) as span:
        span.set_attribute("messaging.destination", subject)
        headers = telemetry.inject({"Nats-Msg-Id": msg_id})
        try:
            ack = await js.publish(subject, data, timeout=timeout, headers=headers)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"{what} unavailable: {type(exc).__name__}") from exc
        span.set_attribute("messaging.duplicate", bool(ack.duplicate))


class JetStreamSigningQueue:
    """Publishes approved requests to the signing work-queue stream (Nats-Msg-Id = request id)."""

    def __init__(self, js: JetStreamContext, timeout_seconds: float = 2.0) -> None:
        self._js = js
        self._timeout = timeout_seconds

    async def submit(self, request: SignCertificate) -> None:
        await _publish(self._js, subjects.CARA_SIGN, request.model_dump_json().encode(), request.request_id,
                       self._timeout, "signing queue")


class JetStreamExpiryPublisher:
    """Publishes expiry notices into stream PKI_EXPIRY (Nats-Msg-Id = issuer:serial:window)."""

    def __init__(self, js: JetStreamContext, timeout_seconds: float = 2.0) -> None:
        self._js = js
        self._timeout = timeout_seconds

    async def expiring(self, notice: ExpiryNotice) -> None:
        await _publish(self._js, subjects.CLM_EXPIRING, notice.event_json.encode(), notice.msg_id, self._timeout,
                       "expiry stream")


class NatsEventPublisher:
    """CLM's events on core NATS, with trace context in the headers."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    async def revoked(self, event: CertificateRevoked) -> None:
        try:
            await self._nc.publish(subjects.CLM_REVOKED, event.model_dump_json().encode(), headers=telemetry.inject())
        except NatsError as exc:
            raise Unavailable(f"event bus unavailable: {type(exc).__name__}") from exc
