"""Exceptions map to contract errors in one place; internals never reach the wire."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hapki.contracts import errors
from hapki.contracts.errors import ErrorCode
from hapki.contracts.models import CertificateReply, IssueCertificate, IssueReply
from hapki.runtime.edge import error_body, error_reply


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
