"""The one mapping from exceptions to contract error bodies, used at every service edge.

Internal details never leave: an unexpected exception becomes INTERNAL with a generic message, and the
details go to the log under the current trace id.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from hapki.contracts.errors import ErrorCode, HapkiError
from hapki.contracts.models import ErrorBody

log = logging.getLogger("hapki.edge")


def _validation_details(exc: ValidationError) -> dict[str, Any]:
    problems = [
        {"field": ".".join(str(p) for p in err["loc"] if p != "body") or "(message)", "problem": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)[:10]
    ]
    return {"problems": problems}


def error_body(exc: BaseException) -> ErrorBody:
    """The wire error for an exception raised while handling a request."""
    if isinstance(exc, ValidationError):
        details = _validation_details(exc)
        first = details["problems"][0] if details["problems"] else {"field": "(message)", "problem": "invalid"}
        return ErrorBody(
            code=ErrorCode.MALFORMED_MESSAGE, message=f"{first['field']}: {first['problem']}", details=details
        )
    if isinstance(exc, HapkiError) and exc.code is not ErrorCode.INTERNAL:
        return ErrorBody(code=exc.code, message=exc.message, details=exc.details)
    log.error("internal error while handling a request", exc_info=exc)
    return ErrorBody(code=ErrorCode.INTERNAL, message="internal error; see the service log for this trace id")


def error_reply(exc: BaseException) -> dict[str, Any]:
    """A reply carrying only the error: parses as IssueReply and as CertificateReply. Releases `exc` (see there)."""
    try:
        return {"error": error_body(exc).model_dump(mode="json")}
    finally:
        release(exc)


def release(exc: BaseException) -> None:
    """Drop the tracebacks of `exc` and of the exceptions chained to it (cause, context, group members).

    A traceback holds the frames the exception went through, and a finished frame keeps its locals, which often hold
    the exception itself (`except ... as exc:` that raises another error, a task awaited there that stores it): a
    cycle, so a refused request's frames, cursors, results and models were left to the cyclic collector, which the
    services run rarely (hapki.runtime.eventloop.SERVICE_GC_THRESHOLDS). In CLM each idempotency conflict left about
    140 such objects, and a burst of conflicts piled up megabytes between collections (docs/PERFORMANCE.md, Session
    9). Called once the error is mapped and logged. Not frame.clear() (traceback.clear_frames): on Python 3.11 that
    closes a coroutine whose frame caught the exception and went on, such as a loop that hands errors to waiters.
    A caller joined to the same attempt that raises the same exception later gets a traceback of its own frames.
    """
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
