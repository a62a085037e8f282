"""CARA's result events into CLM: plain nats-py subscriptions on CLM's own connection, not FastStream subscribers.

Every issuance brings CLM one event (the certificate and its chain), and all CLM does with it is wake the request's
waiters. Through FastStream's subscriber machinery (middlewares, dependency injection, subject matching, log
context) that cost about 0.7 ms of CPU per event under cProfile, of which the handler was 0.02 ms: the largest
single item of CLM's CPU per issuance (docs/PERFORMANCE.md, "CLM's result events"). Here an event is checked
against the size cap, parsed by its contract model and handed to the service; the rules are the broker's: an
oversized or malformed event is dropped and logged (CARA published it, there is nobody to answer), and no trace
span is made (CLM's broker never traced result events either). The AsyncAPI document still lists CLM as their
receiver (hapki.cli.asyncapi).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from hapki.clm.service import ClmService
from hapki.contracts import subjects
from hapki.contracts.limits import MAX_EVENT_BYTES
from hapki.contracts.models import CertificateIssued, SigningFailed

__all__ = ["handlers", "subscribe"]

log = logging.getLogger("hapki.clm.results")
E = TypeVar("E", bound=BaseModel)


def handlers(service: ClmService) -> dict[str, Callable[[Msg], Awaitable[None]]]:
    """The callback of each result subject, bound to `service`."""
    return {
        subjects.CARA_ISSUED: _handler(subjects.CARA_ISSUED, CertificateIssued, service.on_issued),
        subjects.CARA_FAILED: _handler(subjects.CARA_FAILED, SigningFailed, service.on_failed),
    }


async def subscribe(nc: Client, service: ClmService) -> list[Subscription]:
    """Subscribe to the result events (no queue group: every CLM member wakes its own waiters); flushed, so the
    server has the subscriptions before the caller publishes its first signing request."""
    subscriptions = [await nc.subscribe(subject, cb=callback) for subject, callback in handlers(service).items()]
    await nc.flush()
    return subscriptions


def _handler(subject: str, model: type[E], deliver: Callable[[E], None]) -> Callable[[Msg], Awaitable[None]]:
    async def on_message(msg: Msg) -> None:
        size = len(msg.data)
        if size > MAX_EVENT_BYTES:
            log.error("dropped an oversized event on %s: %d bytes, the limit is %d", subject, size, MAX_EVENT_BYTES)
            return
        try:
            event = model.model_validate_json(msg.data)
        except ValidationError as exc:
            log.error("dropped a malformed event on %s: %s", subject, _summary(exc))
            return
        deliver(event)

    return on_message


def _summary(exc: ValidationError) -> str:
    """Where and what, without echoing the input (an event carries certificates; a forged one could carry anything)."""
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}" for error in exc.errors()[:3])
