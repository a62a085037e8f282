"""The expiry scheduler's steps with hand-written fakes: record, publish, mark; failures leave work for next run."""

from __future__ import annotations

from datetime import UTC, datetime

from hapki.clm.expiry import ExpiryScheduler
from hapki.clm.ports import ExpiryNotice
from hapki.contracts.errors import Unavailable

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class FakeStore:
    """Certificates due per window; notices keyed like the table's primary key."""

    def __init__(self, due: dict[int, list[str]]) -> None:
        self.due = due
        self.notices: dict[tuple[str, int], ExpiryNotice] = {}
        self.published: set[tuple[str, int]] = set()
        self.windows_asked: list[int] = []

    async def record_expiring(self, window_seconds: int, now: datetime, limit: int) -> int:
        self.windows_asked.append(window_seconds)
        new = 0
        for serial in self.due.get(window_seconds, [])[:limit]:
            if (serial, window_seconds) not in self.notices:
                self.notices[(serial, window_seconds)] = ExpiryNotice("ca", serial, window_seconds, f'"{serial}"')
                new += 1
        return new

    async def unpublished_notices(self, limit: int) -> list[ExpiryNotice]:
        return [n for k, n in self.notices.items() if k not in self.published][:limit]

    async def mark_published(self, notices: list[ExpiryNotice], now: datetime) -> None:
        self.published |= {(n.serial, n.window_seconds) for n in notices}


class FakeStream:
    """Keeps one message per id, as a JetStream stream within its duplicate window; can fail after n publishes."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.messages: dict[str, str] = {}
        self.attempts = 0
        self.fail_after = fail_after

    async def expiring(self, notice: ExpiryNotice) -> None:
        if self.fail_after is not None and self.attempts >= self.fail_after:
            raise Unavailable("stream down")
        self.attempts += 1
        self.messages.setdefault(notice.msg_id, notice.event_json)


def _scheduler(store: FakeStore, stream: FakeStream, windows: list[int]) -> ExpiryScheduler:
    return ExpiryScheduler(store=store, publisher=stream, windows_seconds=windows, clock=lambda: NOW, batch=100)


async def test_a_run_records_each_window_largest_first_and_publishes_once() -> None:
    store, stream = FakeStore({604800: ["aa"], 2592000: ["aa", "bb"]}), FakeStream()
    scheduler = _scheduler(store, stream, [604800, 2592000])
    first = await scheduler.run_once()
    assert (first.recorded, first.published) == (3, 3)
    assert store.windows_asked == [2592000, 604800]
    assert set(stream.messages) == {"ca:aa:2592000", "ca:bb:2592000", "ca:aa:604800"}
    second = await scheduler.run_once()
    assert (second.recorded, second.published) == (0, 0) and stream.attempts == 3


async def test_a_failed_publish_is_retried_next_run_and_what_was_acked_is_not_sent_again() -> None:
    store, stream = FakeStore({86400: ["aa", "bb", "cc"]}), FakeStream(fail_after=1)
    scheduler = _scheduler(store, stream, [86400])
    run = await scheduler.run_once()
    assert (run.recorded, run.published) == (3, 1)
    assert store.published == {("aa", 86400)}
    stream.fail_after = None
    run = await scheduler.run_once()
    assert (run.recorded, run.published) == (0, 2)
    assert stream.attempts == 3 and len(stream.messages) == 3


async def test_msg_id_names_issuer_serial_and_window() -> None:
    assert ExpiryNotice("issuing-1", "0a", 86400, "{}").msg_id == "issuing-1:0a:86400"
