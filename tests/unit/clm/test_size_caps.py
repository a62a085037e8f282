"""Size caps at CLM's NATS edge: every subscriber, present and future, refuses an oversized message unparsed."""

from __future__ import annotations

import json
import logging

import pytest
from faststream.nats import TestNatsBroker

from hapki.clm.app import build_broker, size_cap
from hapki.contracts import subjects
from hapki.contracts.limits import MAX_EVENT_BYTES, MAX_REQUEST_BYTES


class Spy:
    """A ClmService stand-in that records which handler ran (none may, for an oversized message)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        def record(*args: object) -> None:
            self.calls.append(name)
            raise AssertionError(f"{name} ran on an oversized message")

        return record


def _subscribed(broker: object) -> set[str]:
    return {sub.subject.broker_address for sub in broker.subscribers}  # type: ignore[attr-defined]


REQUEST_SUBJECTS = [subjects.CLM_ISSUE, subjects.CLM_STATUS, subjects.CLM_CERTIFICATE, subjects.CLM_REVOKE,
                    subjects.CLM_SEARCH, subjects.CLM_RENEW]
EVENT_SUBJECTS = [subjects.CARA_ISSUED, subjects.CARA_FAILED]


def test_every_subscriber_is_listed_here() -> None:
    """A new subscriber must be added to this test (and gets the broker-wide cap automatically)."""
    assert _subscribed(build_broker("nats://127.0.0.1:1", None)) == set(REQUEST_SUBJECTS + EVENT_SUBJECTS)


@pytest.mark.parametrize("subject", REQUEST_SUBJECTS)
async def test_an_oversized_request_gets_message_too_large_on_every_subject(subject: str) -> None:
    spy = Spy()
    broker = build_broker("nats://127.0.0.1:1", spy)  # type: ignore[arg-type]
    body = b'{"x": "' + b"a" * MAX_REQUEST_BYTES + b'"}'
    async with TestNatsBroker(broker) as test_broker:
        reply = await test_broker.request(body, subject=subject, timeout=5)
        error = json.loads(reply.body)["error"]
    assert error["code"] == "MESSAGE_TOO_LARGE"
    assert error["details"] == {"size": len(body), "limit": MAX_REQUEST_BYTES}
    assert spy.calls == []


@pytest.mark.parametrize("subject", EVENT_SUBJECTS)
async def test_an_oversized_event_is_dropped_and_logged(subject: str, caplog: pytest.LogCaptureFixture) -> None:
    spy = Spy()
    broker = build_broker("nats://127.0.0.1:1", spy)  # type: ignore[arg-type]
    body = b'{"x": "' + b"a" * MAX_EVENT_BYTES + b'"}'
    with caplog.at_level(logging.ERROR, logger="hapki.clm.app"):
        async with TestNatsBroker(broker) as test_broker:
            await test_broker.publish(body, subject=subject)
    assert spy.calls == []
    assert f"dropped an oversized event on {subject}" in caplog.text


def test_events_may_be_larger_than_requests() -> None:
    assert size_cap(subjects.CARA_ISSUED) == MAX_EVENT_BYTES > MAX_REQUEST_BYTES == size_cap(subjects.CLM_ISSUE)
