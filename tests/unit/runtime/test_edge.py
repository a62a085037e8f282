"""Exceptions map to contract errors in one place; internals never reach the wire."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from pydantic import ValidationError

from hapki.contracts import errors
from hapki.contracts.errors import ErrorCode
from hapki.contracts.models import CertificateReply, IssueCertificate, IssueReply
from hapki.runtime.edge import error_body, error_reply, release


def test_every_error_code_has_an_exception_class() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.HapkiError)]
    assert {c.code for c in classes} == set(ErrorCode)


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        IssueCertificate.model_validate({"csr_pem": "x", "profile": 3, "requester": "r"})
    body = error_body(info.value)
    assert body.code is ErrorCode.MALFORMED_MESSAGE
    assert body.details["problems"][0]["field"] == "profile"


def test_hapki_errors_keep_code_message_and_details() -> None:
    body = error_body(errors.ForbiddenName("no", {"name": "x.evil"}))
    assert (body.code, body.message, body.details) == (ErrorCode.FORBIDDEN_NAME, "no", {"name": "x.evil"})


@pytest.mark.parametrize("exc", [RuntimeError("db password is hunter2"), errors.Internal("SQL: SELECT secret")])
def test_internal_errors_hide_their_details(exc: Exception) -> None:
    body = error_body(exc)
    assert body.code is ErrorCode.INTERNAL
    assert "hunter2" not in body.message and "secret" not in body.message and body.details == {}


def test_error_reply_parses_as_every_reply_model() -> None:
    reply = error_reply(errors.NotFound("gone"))
    assert IssueReply.model_validate(reply).error.code is ErrorCode.NOT_FOUND
    assert CertificateReply.model_validate(reply).error.code is ErrorCode.NOT_FOUND


class _Request:
    """Stands for what a handler's frames hold (cursors, results, the request): freed or not with them."""


def _store_like(request: _Request) -> None:
    last = None
    for _ in range(2):
        try:
            raise OSError("connection reset")  # the driver's error, retried
        except OSError as exc:
            last = exc  # kept across attempts, as Database.run does
    try:
        raise KeyError("duplicate entry")
    except KeyError:  # the frame keeps `last` (and `request`) once the new error leaves it
        raise errors.IdempotencyConflict("key reused") from last


async def _joined(request: _Request) -> None:
    async def work() -> None:
        raise errors.NotFound("gone")

    task = asyncio.ensure_future(work())  # the frame keeps the task, which keeps the error raised through it
    await asyncio.shield(task)


@pytest.fixture
def no_collector():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_an_answered_error_frees_what_its_frames_held_without_the_collector(no_collector: None) -> None:
    request = _Request()
    held = weakref.ref(request)
    try:
        _store_like(request)
    except errors.HapkiError as exc:
        reply = error_reply(exc)
    del request
    assert reply["error"]["code"] == ErrorCode.IDEMPOTENCY_CONFLICT.value
    assert held() is None  # reference counting freed it: no cycle through the frames is left


async def test_an_error_raised_through_an_awaited_task_is_released_too(no_collector: None) -> None:
    request = _Request()
    held = weakref.ref(request)
    try:
        await _joined(request)
    except errors.HapkiError as exc:
        release(exc)
    del request
    await asyncio.sleep(0)  # the task's done callbacks run
    assert held() is None


async def test_release_leaves_a_coroutine_that_caught_the_error_running() -> None:
    """A loop that hands an error to a waiter and goes on has its frame in the error's traceback. Clearing the frames
    (traceback.clear_frames, the first version of release) closed that coroutine on Python 3.11."""
    handed = asyncio.get_running_loop().create_future()
    go_on = asyncio.Event()

    async def loop() -> str:
        try:
            raise errors.NotFound("gone")
        except errors.HapkiError as exc:
            handed.set_exception(exc)
        await go_on.wait()  # suspended here while the waiter answers the error
        return "still running"

    task = asyncio.ensure_future(loop())
    with pytest.raises(errors.NotFound) as info:
        await handed
    assert error_reply(info.value)["error"]["code"] == ErrorCode.NOT_FOUND.value
    go_on.set()
    assert await asyncio.wait_for(task, 1) == "still running"
