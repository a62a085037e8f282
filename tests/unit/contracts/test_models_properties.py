"""Property tests of the wire models: bad input raises only pydantic's ValidationError; valid models round-trip."""

from __future__ import annotations

import contextlib
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hapki.contracts.models import MAX_CSR_CHARS, IssueCertificate, SignCertificate

PROPERTY = settings(max_examples=200, deadline=None)

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
ISSUE_FIELDS = sorted(IssueCertificate.model_fields)
# Dicts whose keys are mostly the model's own, so validation gets past "unknown field" into each field's rules.
ISSUE_LIKE = st.dictionaries(st.sampled_from(ISSUE_FIELDS) | st.text(max_size=10), JSON_VALUES, max_size=6)


def only_validation_errors(call, payload) -> None:
    """Call; a ValidationError is fine, any other exception propagates and fails the test."""
    with contextlib.suppress(ValidationError):
        call(payload)


@PROPERTY
@given(JSON_VALUES)
def test_arbitrary_json_values_raise_only_validation_error(payload: object) -> None:
    only_validation_errors(IssueCertificate.model_validate, payload)
    only_validation_errors(IssueCertificate.model_validate_json, json.dumps(payload))


@PROPERTY
@given(ISSUE_LIKE)
def test_issue_like_dicts_raise_only_validation_error(payload: dict) -> None:
    only_validation_errors(IssueCertificate.model_validate, payload)
    only_validation_errors(IssueCertificate.model_validate_json, json.dumps(payload))
    only_validation_errors(SignCertificate.model_validate, payload)


@PROPERTY
@given(st.binary(max_size=500))
def test_arbitrary_bytes_raise_only_validation_error(data: bytes) -> None:
    only_validation_errors(IssueCertificate.model_validate_json, data)
    only_validation_errors(SignCertificate.model_validate_json, data)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        IssueCertificate.model_validate({"csr_pem": "x", "profile": "p", "requester": "r", "admin": True})


def test_oversized_csr_is_refused() -> None:
    with pytest.raises(ValidationError):
        IssueCertificate(csr_pem="x" * (MAX_CSR_CHARS + 1), profile="p", requester="r")


_IDEMPOTENCY_KEY = st.text(alphabet=string.ascii_letters + string.digits + "._:-", min_size=1, max_size=128)
ISSUE_CERTIFICATES = st.builds(
    IssueCertificate,
    csr_pem=st.text(max_size=200),
    profile=st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z"),
    idempotency_key=st.none() | _IDEMPOTENCY_KEY,
    requester=st.from_regex(r"\A[\x21-\x7e]([\x20-\x7e]{0,126}[\x21-\x7e])?\Z"),
)
_NAMES = st.lists(st.text(max_size=30), max_size=5)
SIGN_CERTIFICATES = st.builds(
    SignCertificate,
    request_id=st.from_regex(r"\A[0-9a-f]{32}\Z"),
    profile=st.text(max_size=64),
    csr_pem=st.text(max_size=200),
    common_name=st.none() | st.text(max_size=64),
    dns_names=_NAMES,
    ip_addresses=_NAMES,
    emails=_NAMES,
    validity_seconds=st.integers(1, 398 * 86400),
    key_usage=_NAMES,
    extended_key_usage=_NAMES,
)


@PROPERTY
@given(ISSUE_CERTIFICATES)
def test_issue_certificate_round_trips(model: IssueCertificate) -> None:
    assert IssueCertificate.model_validate_json(model.model_dump_json()) == model
    assert IssueCertificate.model_validate(model.model_dump()) == model


@PROPERTY
@given(SIGN_CERTIFICATES)
def test_sign_certificate_round_trips(model: SignCertificate) -> None:
    assert SignCertificate.model_validate_json(model.model_dump_json()) == model
    assert SignCertificate.model_validate(model.model_dump()) == model
