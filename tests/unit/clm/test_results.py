"""CARA's result events into CLM (hapki.clm.results): a good event reaches the service, anything else is dropped
and logged without reaching it or raising (the subscription's callback must survive whatever is published)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from hapki.clm import results
from hapki.contracts import subjects
from hapki.contracts.models import CertificateIssued, ErrorBody, SigningFailed


class Recorder:
    """A ClmService stand-in that keeps the events handed to it."""

    def __init__(self) -> None:
        self.issued: list[CertificateIssued] = []
        self.failed: list[SigningFailed] = []

    def on_issued(self, event: CertificateIssued) -> None:
        self.issued.append(event)

    def on_failed(self, event: SigningFailed) -> None:
        self.failed.append(event)


class FakeMsg:
    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data = subject, data


ISSUED = CertificateIssued(
    request_id="0" * 32, serial="0a", issuer="issuing-1", certificate_pem="cert", chain_pem="chain",
    not_before=datetime(2026, 1, 1, tzinfo=timezone.utc), not_after=datetime(2026, 4, 1, tzinfo=timezone.utc))
FAILED = SigningFailed(request_id="1" * 32, error=ErrorBody(code="POLICY_VIOLATION", message="no"))


async def test_each_event_reaches_its_handler_parsed() -> None:
    service = Recorder()
    handlers = results.handlers(service)  # type: ignore[arg-type]
    await handlers[subjects.CARA_ISSUED](FakeMsg(subjects.CARA_ISSUED, ISSUED.model_dump_json().encode()))  # type: ignore[arg-type]
    await handlers[subjects.CARA_FAILED](FakeMsg(subjects.CARA_FAILED, FAILED.model_dump_json().encode()))  # type: ignore[arg-type]
    assert service.issued == [ISSUED]
    assert service.failed == [FAILED]


@pytest.mark.parametrize("body", [b"\xff\xfe garbage", b"{}", b'{"request_id": 7}', b"[]", b""])
@pytest.mark.parametrize("subject", [subjects.CARA_ISSUED, subjects.CARA_FAILED])
async def test_a_malformed_event_is_dropped_and_logged(subject: str, body: bytes,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    service = Recorder()
    with caplog.at_level(logging.ERROR, logger="hapki.clm.results"):
        await results.handlers(service)[subject](FakeMsg(subject, body))  # type: ignore[arg-type]
    assert service.issued == [] and service.failed == []
    assert f"dropped a malformed event on {subject}" in caplog.text


async def test_the_wrong_event_on_a_subject_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """A SigningFailed published on the issued subject must not wake anyone as if a certificate had come."""
    service = Recorder()
    with caplog.at_level(logging.ERROR, logger="hapki.clm.results"):
        await results.handlers(service)[subjects.CARA_ISSUED](  # type: ignore[arg-type]
            FakeMsg(subjects.CARA_ISSUED, FAILED.model_dump_json().encode()))
    assert service.issued == [] and service.failed == []
    assert "serial: Field required" in caplog.text
