"""Names and fields that could inject into logs, SQL or certificate fields are refused, naming the field."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve
from hapki.contracts.errors import ForbiddenName, HapkiError, InvalidName
from hapki.contracts.models import IssueCertificate, RenewCertificate, RevokeCertificate, SearchCertificates
from hapki.runtime.edge import error_body
from helpers.csr import make_csr, raw_cn, raw_email

PROFILES = load_profiles(SHIPPED_PROFILES_PATH)
INJECTIONS = ["a\nb", "a\rb", "a\x00b", "a\x1b[31mb", "a\u202eb", "a\u2066b", "a\u2028b", "a\x85b", "a\tb",
              " alice", "alice ", "a\u200bb", "a\x7fb"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_requester_with_control_or_invisible_characters_is_refused_naming_the_field(value: str) -> None:
    for build in (
        lambda: IssueCertificate(csr_pem="x", profile="tls-server", requester=value),
        lambda: RevokeCertificate(serial="0a", reason="superseded", requester=value),
        lambda: RenewCertificate(serial="0a", csr_pem="x", requester=value),
        lambda: SearchCertificates(requester=value),
    ):
        with pytest.raises(ValidationError) as info:
            build()
        body = error_body(info.value)
        assert body.code.value == "MALFORMED_MESSAGE" and body.details["problems"][0]["field"] == "requester"


@pytest.mark.parametrize("value", ["tls server", "tls-server\n", "tls/../server", "tls-server\u202e", "x'; DROP"])
def test_profile_names_are_letters_digits_dot_underscore_hyphen(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        IssueCertificate(csr_pem="x", profile=value, requester="alice")
    assert error_body(info.value).details["problems"][0]["field"] == "profile"


def test_ordinary_requesters_and_profiles_still_pass() -> None:
    for requester in ("alice", "svc:payments/prod", "Bob Smith", "o'brien@example.com", "x" * 128):
        IssueCertificate(csr_pem="x", profile="tls-server", requester=requester)


def _refusal(csr_pem: str, profile: str = "tls-server") -> HapkiError:
    with pytest.raises((InvalidName, ForbiddenName)) as info:
        approve(IssueCertificate(csr_pem=csr_pem, profile=profile, requester="alice"), PROFILES, "f" * 32)
    return info.value


@pytest.mark.parametrize("value", INJECTIONS + ["a.example.com\n", "a.example.com'--", "a.example.com;x"])
def test_a_cn_that_could_inject_is_refused_naming_subject_cn(value: str) -> None:
    csr, _ = make_csr(["a.example.com"], subject=[raw_cn(value)])
    error = _refusal(csr)
    assert error.details["field"] == "subject.CN"
    assert "\n" not in error.message and "\x00" not in error.message  # the message shows it escaped (repr)


@pytest.mark.parametrize("value", ["a\n.example.com", "a\x00b.example.com", "a b.example.com", "a'.example.com",
                                   "a%0a.example.com", "<script>.example.com"])
def test_a_dns_san_that_could_inject_is_refused(value: str) -> None:
    error = _refusal(make_csr([x509.DNSName(value)])[0])
    assert isinstance(error, InvalidName) and error.details["field"] == "san.dns"


@pytest.mark.parametrize("value", ["a\nb@example.com", "a\x00@example.com", '"a b"@example.com',
                                   "a@example.com\r\nBcc: x@example.com"])
def test_an_email_san_that_could_inject_is_refused(value: str) -> None:
    error = _refusal(make_csr([raw_email(value)])[0], "tls-client")  # the profile that allows emails
    assert isinstance(error, InvalidName) and error.details["field"] == "san.email"


def test_other_subject_attributes_are_refused_whatever_they_hold() -> None:
    attribute = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil\nCorp")
    error = _refusal(make_csr(["a.example.com"], cn="a.example.com", subject=[attribute])[0])
    assert error.details["field"] == "subject" and "\n" not in error.message


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=3),
       st.integers(0, 13))
def test_any_control_or_format_character_anywhere_in_a_cn_is_refused(bad: str, position: int) -> None:
    name = "a.example.com"
    value = name[:position] + bad + name[position:]
    csr, _ = make_csr(["a.example.com"], subject=[raw_cn(value)])
    assert _refusal(csr).details["field"] == "subject.CN"
