"""CLM's checks before the CA: one test per error path, and the happy paths of the shipped profiles."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, Profile, load_profiles
from hapki.runtime.validation import approve, check_message_size
from hapki.contracts.errors import (
    BadCSRSignature,
    ForbiddenName,
    HapkiError,
    InvalidName,
    KeyPolicyViolation,
    MalformedCSR,
    MessageTooLarge,
    UnknownProfile,
)
from hapki.contracts.models import MAX_REQUEST_BYTES, IssueCertificate, SignCertificate
from helpers.csr import csr_der, der_to_pem, make_csr, make_key, raw_cn, raw_email

REQUEST_ID = "0123456789abcdef0123456789abcdef"
PROFILES = load_profiles(SHIPPED_PROFILES_PATH)


def issue(pem: str, profile: str = "tls-server", profiles: dict[str, Profile] = PROFILES) -> SignCertificate:
    return approve(IssueCertificate(csr_pem=pem, profile=profile, requester="tester"), profiles, REQUEST_ID)


def refused(error: type[HapkiError], pem: str, profile: str = "tls-server", **kwargs) -> HapkiError:
    with pytest.raises(error) as info:
        issue(pem, profile, **kwargs)
    assert info.value.details, "every error names what was wrong"
    return info.value


def variant(name: str = "tls-server", **changes) -> dict[str, Profile]:
    """The shipped profile `name` with some fields changed, as a one-profile mapping."""
    data = PROFILES[name].model_dump() | changes
    return {name: Profile.model_validate(data)}


# --- happy paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_tls_server_happy_path(kind: str) -> None:
    pem, _ = make_csr(
        ["A.Example.COM", "a.example.com", "*.svc.internal", "10.1.2.3", "2001:DB8::0:1"],
        key=make_key(kind),
        cn="www.example.com",
    )
    approved = issue(pem)
    assert approved.request_id == REQUEST_ID
    assert approved.profile == "tls-server"
    assert approved.common_name == "www.example.com"
    # Lowercased, de-duplicated, first-seen order; the CN becomes a SAN.
    assert approved.dns_names == ["a.example.com", "*.svc.internal", "www.example.com"]
    assert approved.ip_addresses == ["10.1.2.3", "2001:db8::1"]
    assert approved.emails == []
    assert approved.validity_seconds == 90 * 86400
    assert approved.extended_key_usage == ["server_auth"]
    # keyEncipherment only for RSA (TLS 1.2 key transport); RFC 5480 forbids it on EC keys.
    expected_usage = ["digital_signature", "key_encipherment"] if kind.startswith("rsa") else ["digital_signature"]
    assert approved.key_usage == expected_usage
    assert approved.csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----")


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_tls_client_happy_path(kind: str) -> None:
    pem, _ = make_csr(["alice@Example.ORG", "client.test"], key=make_key(kind), cn="alice@example.org")
    approved = issue(pem, "tls-client")
    assert approved.common_name == "alice@example.org"
    assert approved.emails == ["alice@example.org"]
    assert approved.dns_names == ["client.test"]
    assert approved.ip_addresses == []
    assert approved.validity_seconds == 30 * 86400
    assert approved.key_usage == ["digital_signature"]
    assert approved.extended_key_usage == ["client_auth"]


def test_cn_only_request_gets_the_cn_as_its_san() -> None:
    approved = issue(make_csr([], cn="Solo.Example.Net")[0])
    assert approved.common_name == "solo.example.net"
    assert approved.dns_names == ["solo.example.net"]


def test_ip_literal_cn_becomes_an_ip_san() -> None:
    approved = issue(make_csr(["db.internal"], cn="192.168.1.10")[0])
    assert approved.common_name == "192.168.1.10"
    assert approved.ip_addresses == ["192.168.1.10"]


def test_base64_der_without_armour_is_accepted() -> None:
    der = csr_der(make_csr(["a.example.com"])[0])
    approved = issue(base64.encodebytes(der).decode("ascii"))
    assert approved.dns_names == ["a.example.com"]
    assert approved.csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_valid_a_label_is_accepted() -> None:
    assert issue(make_csr(["xn--bcher-kva.example.com"])[0]).dns_names == ["xn--bcher-kva.example.com"]


# --- UnknownProfile, MalformedCSR, BadCSRSignature ------------------------------------------------------------


def test_unknown_profile() -> None:
    error = refused(UnknownProfile, make_csr(["a.example.com"])[0], "code-signing")
    assert error.details["field"] == "profile"
    assert error.details["value"] == "code-signing"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        "garbage",
        "not base64 !!!",
        base64.b64encode(b"\x30\x03\x02\x01\x00").decode(),  # base64 of DER that is not a CSR
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n",
        "ü",
        der_to_pem(b"\x30\x80\x00\x00"),  # indefinite length: BER, not DER
    ],
)
def test_malformed_csr(text: str) -> None:
    error = refused(MalformedCSR, text)
    assert error.details["field"] == "csr_pem"
    assert error.details["reason"]


def test_truncated_csr_is_malformed() -> None:
    der = csr_der(make_csr(["a.example.com"])[0])
    refused(MalformedCSR, der_to_pem(der[:-10]))


def test_tampered_signature_bytes() -> None:
    der = bytearray(csr_der(make_csr(["a.example.com"])[0]))
    der[-1] ^= 0x01  # last octet of the ECDSA signature's s: structure intact, value wrong
    error = refused(BadCSRSignature, der_to_pem(bytes(der)))
    assert error.details["field"] == "csr_pem"


def test_tampered_rsa_signature_bytes() -> None:
    der = bytearray(csr_der(make_csr(["a.example.com"], key=make_key("rsa2048"))[0]))
    der[-5] ^= 0xFF
    refused(BadCSRSignature, der_to_pem(bytes(der)))


def test_tampered_request_body() -> None:
    """A name changed after signing: the signature no longer covers what is asked for."""
    der = csr_der(make_csr(["a.example.com"])[0])
    tampered = der.replace(b"a.example.com", b"b.example.com")
    assert tampered != der
    refused(BadCSRSignature, der_to_pem(tampered))


# --- KeyPolicyViolation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("rsa1024", {"key_type": "rsa", "key_size": 1024}),
        ("rsa2048e3", {"key_type": "rsa", "key_size": 2048, "exponent": 3}),
        ("ed25519", {"key_type": "ed25519"}),
        ("ed448", {"key_type": "ed448"}),
        ("dsa2048", {"key_type": "dsa"}),
        ("p521", {"key_type": "ec", "curve": "secp521r1"}),
        ("secp256k1", {"key_type": "ec", "curve": "secp256k1"}),
        ("brainpoolp256r1", {"key_type": "ec", "curve": "brainpoolP256r1"}),
    ],
)
def test_key_policy_violation(kind: str, expected: dict) -> None:
    error = refused(KeyPolicyViolation, make_csr(["a.example.com"], key=make_key(kind))[0])
    assert error.details.items() >= expected.items()
    assert error.details["allowed"]["ec_curves"] == ["secp256r1", "secp384r1"]
    assert error.details["allowed"]["rsa_bits"] == [2048, 8192]


def test_key_policy_follows_the_profile() -> None:
    only_p384 = variant(ec_curves=["secp384r1"], allow_rsa=False)
    refused(KeyPolicyViolation, make_csr(["a.example.com"], key=make_key("p256"))[0], profiles=only_p384)
    error = refused(KeyPolicyViolation, make_csr(["a.example.com"], key=make_key("rsa2048"))[0], profiles=only_p384)
    assert error.details["allowed"]["rsa_bits"] is None
    assert issue(make_csr(["a.example.com"], key=make_key("p384"))[0], profiles=only_p384)

    big_rsa_only = variant(rsa_min_bits=3072)
    error = refused(KeyPolicyViolation, make_csr(["a.example.com"], key=make_key("rsa2048"))[0], profiles=big_rsa_only)
    assert error.details["key_size"] == 2048


# --- InvalidName ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "-a.example.com",  # leading hyphen
        "a-.example.com",  # trailing hyphen
        "a..example.com",  # empty label
        ".example.com",  # empty leftmost label
        "a.example.com.",  # trailing dot
        "a_b.example.com",  # underscore is not LDH
        "a b.example.com",
        "a" * 64 + ".example.com",  # label over 63
        ".".join(["a" * 60] * 4) + ".example.com",  # over 253 in total
        "*.*.example.com",  # more than one wildcard
        "a.*.example.com",  # wildcard not leftmost
        "f*o.example.com",  # partial-label wildcard
        "*",  # wildcard with no base
        "ab--cd.example.com",  # reserved R-LDH label that is not an A-label
        "xn--.example.com",  # empty punycode
        "xn--abc-.example.com",  # decodes to ASCII: not a real A-label
        "host.example.123",  # numeric TLD looks like an IPv4 address
        "",
    ],
)
def test_invalid_dns_name(name: str) -> None:
    error = refused(InvalidName, make_csr([name])[0])
    assert error.details["field"] == "san.dns"
    assert error.details["name"].startswith(name[:200])
    assert error.details["reason"]


def test_non_ascii_cn_is_invalid() -> None:
    error = refused(InvalidName, make_csr([], cn="bücher.example.com")[0])
    assert error.details == {
        "field": "subject.CN",
        "name": "bücher.example.com",
        "reason": "non-ASCII characters: use A-labels (xn--...)",
    }


def test_cn_longer_than_64_is_invalid() -> None:
    long_name = "a" * 60 + ".example.com"
    error = refused(InvalidName, make_csr([long_name], subject=[raw_cn(long_name)])[0])
    assert error.details["field"] == "subject.CN"


@pytest.mark.parametrize(
    "email", ["a@@example.com", "@example.com", ".a@example.com", "a..b@example.com", "a@-x.example.com", "a@b@"]
)
def test_invalid_email(email: str) -> None:
    error = refused(InvalidName, make_csr([raw_email(email)])[0], "tls-client")
    assert error.details["field"] == "san.email"
    assert error.details["name"] == email


def test_ip_network_in_san_is_invalid() -> None:
    import ipaddress

    error = refused(InvalidName, make_csr([x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))])[0])
    assert error.details["field"] == "san.ip"


# --- ForbiddenName --------------------------------------------------------------------------------------------


def test_domain_not_allowed() -> None:
    error = refused(ForbiddenName, make_csr(["ok.example.com", "www.evil.com"])[0])
    assert error.details == {"field": "san.dns", "name": "www.evil.com", "reason": "not in or under an allowed domain"}


def test_lookalike_domain_is_not_a_subdomain() -> None:
    refused(ForbiddenName, make_csr(["notexample.com"])[0])


def test_wildcard_refused_by_tls_client() -> None:
    error = refused(ForbiddenName, make_csr(["*.example.com"])[0], "tls-client")
    assert error.details["name"] == "*.example.com"
    assert "wildcard" in error.details["reason"]


def test_wildcard_over_a_whole_tld_is_refused() -> None:
    """`test` is an allowed domain, but `*.test` would cover all of it."""
    error = refused(ForbiddenName, make_csr(["*.test"])[0])
    assert "top-level" in error.details["reason"]
    any_domain = variant(allowed_domains=[])
    refused(ForbiddenName, make_csr(["*.com"])[0], profiles=any_domain)


def test_ip_refused_by_tls_client() -> None:
    error = refused(ForbiddenName, make_csr(["client.example.com", "10.0.0.1"])[0], "tls-client")
    assert error.details["field"] == "san.ip"
    assert error.details["name"] == "10.0.0.1"


def test_email_refused_by_tls_server() -> None:
    error = refused(ForbiddenName, make_csr(["a@example.com"])[0])
    assert error.details["field"] == "san.email"


def test_email_domain_not_allowed() -> None:
    error = refused(ForbiddenName, make_csr(["a@evil.com"])[0], "tls-client")
    assert error.details["name"] == "a@evil.com"


def test_ip_outside_allowed_networks() -> None:
    error = refused(ForbiddenName, make_csr(["a.example.com", "8.8.8.8"])[0])
    assert error.details == {"field": "san.ip", "name": "8.8.8.8", "reason": "not in an allowed IP network"}


@pytest.mark.parametrize(
    "san",
    [
        x509.UniformResourceIdentifier("https://a.example.com/"),
        x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example.com")])),
        x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
        x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x01a"),
    ],
)
def test_other_san_types_are_forbidden(san: x509.GeneralName) -> None:
    error = refused(ForbiddenName, make_csr(["a.example.com", san])[0])
    assert error.details["field"] == f"san.{type(san).__name__}"


def test_subject_attributes_other_than_cn_are_forbidden() -> None:
    organisation = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Ltd")]
    error = refused(ForbiddenName, make_csr(["a.example.com"], cn="a.example.com", subject=organisation)[0])
    assert error.details["field"] == "subject"
    assert "O" in error.details["reason"]


def test_two_cns_are_forbidden() -> None:
    second = [x509.NameAttribute(NameOID.COMMON_NAME, "b.example.com")]
    error = refused(ForbiddenName, make_csr([], cn="a.example.com", subject=second)[0])
    assert error.details["field"] == "subject.CN"


def test_no_names_at_all() -> None:
    refused(ForbiddenName, make_csr([])[0])
    refused(ForbiddenName, make_csr([], san=True)[0])  # an empty SAN extension


def test_require_san() -> None:
    strict = variant(require_san=True)
    error = refused(ForbiddenName, make_csr([], cn="a.example.com")[0], profiles=strict)
    assert "subjectAltName" in error.details["reason"]
    assert issue(make_csr(["a.example.com"], cn="a.example.com")[0], profiles=strict)


def test_too_many_names() -> None:
    names = [f"h{i}.example.com" for i in range(11)]
    error = refused(ForbiddenName, make_csr(names)[0], "tls-client")
    assert error.details["count"] == 11
    assert error.details["limit"] == 10


def test_duplicates_count_once() -> None:
    names = [f"h{i}.example.com" for i in range(10)] + [f"H{i}.EXAMPLE.COM" for i in range(10)]
    assert len(issue(make_csr(names, cn="h0.example.com")[0], "tls-client").dns_names) == 10


# --- message size ---------------------------------------------------------------------------------------------


def test_message_size() -> None:
    check_message_size(b"x" * MAX_REQUEST_BYTES)
    with pytest.raises(MessageTooLarge) as info:
        check_message_size(b"x" * (MAX_REQUEST_BYTES + 1))
    assert info.value.details == {"field": "body", "size": MAX_REQUEST_BYTES + 1, "limit": MAX_REQUEST_BYTES}
