"""Size caps at CLM's NATS edge: every subscriber, present and future, refuses an oversized message unparsed; so do
the result-event subscriptions (hapki.clm.results)."""

from __future__ import annotations

import json
import logging

import pytest
from faststream.nats import TestNatsBroker

from hapki.clm import results
from hapki.clm.app import build_broker
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


class FakeMsg:
    """What a result callback reads of a nats-py message."""

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data = subject, data


def _subscribed(broker: object) -> set[str]:
    return {sub.subject.broker_address for sub in broker.subscribers}  # type: ignore[attr-defined]


REQUEST_SUBJECTS = [subjects.CLM_ISSUE, subjects.CLM_STATUS, subjects.CLM_CERTIFICATE, subjects.CLM_REVOKE,
                    subjects.CLM_SEARCH, subjects.CLM_RENEW]
EVENT_SUBJECTS = [subjects.CARA_ISSUED, subjects.CARA_FAILED]


def test_every_subscriber_is_listed_here() -> None:
    """A new subscriber must be added to this test (and gets the broker-wide cap automatically)."""
    assert _subscribed(build_broker("nats://127.0.0.1:1", None)) == set(REQUEST_SUBJECTS)
    assert set(results.handlers(Spy()).keys()) == set(EVENT_SUBJECTS)  # type: ignore[arg-type]


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
    body = b'{"x": "' + b"a" * MAX_EVENT_BYTES + b'"}'
    with caplog.at_level(logging.ERROR, logger="hapki.clm.results"):
        await results.handlers(spy)[subject](FakeMsg(subject, body))  # type: ignore[arg-type]
    assert spy.calls == []
    assert f"dropped an oversized event on {subject}: {len(body)} bytes, the limit is {MAX_EVENT_BYTES}" in caplog.text


@pytest.mark.parametrize("subject", EVENT_SUBJECTS)
async def test_an_event_at_the_cap_is_not_refused_for_its_size(subject: str, caplog: pytest.LogCaptureFixture) -> None:
    """The cap is on size alone: an event of exactly MAX_EVENT_BYTES goes on to parsing (and fails there, here)."""
    body = b'{"x": "' + b"a" * (MAX_EVENT_BYTES - 9) + b'"}'
    assert len(body) == MAX_EVENT_BYTES
    with caplog.at_level(logging.ERROR, logger="hapki.clm.results"):
        await results.handlers(Spy())[subject](FakeMsg(subject, body))  # type: ignore[arg-type]
    assert "oversized" not in caplog.text
    assert f"dropped a malformed event on {subject}" in caplog.text


def test_events_may_be_larger_than_requests() -> None:
    assert MAX_EVENT_BYTES > MAX_REQUEST_BYTES
