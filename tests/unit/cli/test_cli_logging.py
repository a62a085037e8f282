"""Every `hapki` command drops asyncio's TLS EOF message (the benches printed it once per NATS connection they ended)."""

from __future__ import annotations

import logging

import pytest

from hapki.cli import commands
from hapki.cli import main as cli
from hapki.runtime import telemetry


@pytest.fixture
def asyncio_log():
    log = logging.getLogger("asyncio")
    saved = list(log.filters)
    log.filters[:] = [f for f in saved if not isinstance(f, telemetry.AsyncioTlsEofNoise)]
    try:
        yield log
    finally:
        log.filters[:] = saved


def _passes(log: logging.Logger, message: str) -> bool:
    return log.filter(log.makeRecord("asyncio", logging.WARNING, __file__, 1, message, (), None)) is not False


def test_a_command_drops_the_tls_eof_message_and_nothing_else(asyncio_log, monkeypatch) -> None:
    assert _passes(asyncio_log, telemetry.ASYNCIO_TLS_EOF_NOISE)  # the fixture removed the filter
    monkeypatch.setattr(commands, "docs", lambda args: 0)
    assert cli.main(["docs", "asyncapi"]) == 0
    assert cli.main(["docs", "asyncapi"]) == 0
    assert not _passes(asyncio_log, telemetry.ASYNCIO_TLS_EOF_NOISE)
    assert _passes(asyncio_log, "Task was destroyed but it is pending!")
    assert sum(isinstance(f, telemetry.AsyncioTlsEofNoise) for f in asyncio_log.filters) == 1
