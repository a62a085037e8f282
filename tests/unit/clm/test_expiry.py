"""The expiry scheduler's steps with hand-written fakes: record, publish, mark; failures leave work for next run."""

from __future__ import annotations

from datetime import UTC, datetime

from datetime import timedelta

from hapki.clm.expiry import MAX_BATCHES_PER_RUN, ExpiryScheduler
from hapki.clm.inventory import NEVER, expiry_plan
from hapki.clm.ports import ExpiryBatch, ExpiryNotice
from hapki.contracts.errors import Unavailable

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class FakeStore:
    """Certificates due per window (already decided); notices keyed like the table's primary key."""

    def __init__(self, due: dict[int, list[str]], batches: int = 1) -> None:
        self.due = due
        self.notices: dict[tuple[str, int], ExpiryNotice] = {}
        self.published: set[tuple[str, int]] = set()
        self.calls: list[list[int]] = []
        self.batches = batches

    async def record_expiring(self, windows_seconds, now: datetime, limit: int) -> ExpiryBatch:
        self.calls.append(list(windows_seconds))
        new = 0
        for window in windows_seconds:
            for serial in self.due.get(window, [])[:limit]:
                if (serial, window) not in self.notices:
                    self.notices[(serial, window)] = ExpiryNotice("ca", serial, window, f'"{serial}"')
                    new += 1
        self.batches -= 1
        return ExpiryBatch(examined=limit, recorded=new, more=self.batches > 0)

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
    assert store.calls == [[2592000, 604800]]
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


async def test_a_backlog_is_taken_in_batches_up_to_a_bound_per_run() -> None:
    store = FakeStore({}, batches=1000)
    await _scheduler(store, FakeStream(), [86400]).run_once()
    assert len(store.calls) == MAX_BATCHES_PER_RUN
    store = FakeStore({}, batches=3)
    await _scheduler(store, FakeStream(), [86400]).run_once()
    assert len(store.calls) == 3


WINDOWS = [30 * 86400, 7 * 86400, 86400]


def test_expiry_plan_notices_each_window_entered_and_looks_again_when_the_next_opens() -> None:
    def plan(days_left: float, **flags: bool):
        return expiry_plan(NOW + timedelta(days=days_left), windows=WINDOWS, now=NOW,
                           **{"revoked": False, "renewed": False, **flags})

    far = plan(90)
    assert far.windows == [] and far.next_check == NOW + timedelta(days=60)
    in_30 = plan(29)
    assert in_30.windows == [30 * 86400] and in_30.next_check == NOW + timedelta(days=22)
    exactly = plan(7)  # the 7-day window opens exactly now
    assert exactly.windows == [30 * 86400, 7 * 86400] and exactly.next_check == NOW + timedelta(days=6)
    short_lived = plan(0.5)  # first seen inside every window: a notice for each
    assert short_lived.windows == WINDOWS and short_lived.next_check == NEVER
    for done in (plan(29, revoked=True), plan(29, renewed=True), plan(0), plan(-3)):
        assert done.windows == [] and done.next_check == NEVER
    assert expiry_plan(NOW + timedelta(days=3), revoked=False, renewed=False, windows=[], now=NOW).next_check == NEVER
