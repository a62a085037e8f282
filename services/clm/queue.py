"""JetStream adapter of CLM's SigningQueue: publish with Nats-Msg-Id = request id, trace context in headers."""

from __future__ import annotations

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from opentelemetry import trace

from hapki.contracts import subjects
from hapki.contracts.errors import Unavailable
from hapki.contracts.models import CertificateRevoked, SignCertificate
from hapki.runtime import telemetry

tracer = trace.get_tracer("hapki.clm")


class JetStreamSigningQueue:
    """Publishes approved requests to the signing work-queue stream and waits for the stream's ack."""

    def __init__(self, js: JetStreamContext, timeout_seconds: float = 2.0) -> None:
        self._js = js
        self._timeout = timeout_seconds

    async def submit(self, request: SignCertificate) -> None:
        with tracer.start_as_current_span("bus.publish", kind=trace.SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.destination", subjects.CARA_SIGN)
            headers = telemetry.inject({"Nats-Msg-Id": request.request_id})
            try:
                ack = await self._js.publish(
                    subjects.CARA_SIGN, request.model_dump_json().encode(), timeout=self._timeout, headers=headers
                )
            except (NatsError, TimeoutError) as exc:
                raise Unavailable(f"signing queue unavailable: {type(exc).__name__}") from exc
            span.set_attribute("messaging.duplicate", bool(ack.duplicate))


class NatsEventPublisher:
    """CLM's events on core NATS, with trace context in the headers."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    async def revoked(self, event: CertificateRevoked) -> None:
        try:
            await self._nc.publish(subjects.CLM_REVOKED, event.model_dump_json().encode(), headers=telemetry.inject())
        except NatsError as exc:
            raise Unavailable(f"event bus unavailable: {type(exc).__name__}") from exc
