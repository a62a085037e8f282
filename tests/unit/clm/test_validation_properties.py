"""Property tests: whatever arrives as a CSR, `approve` answers with a HapkiError or an approval, never a crash."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hapki.runtime import names
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve
from hapki.contracts.errors import HapkiError, InvalidName, MalformedCSR
from hapki.contracts.models import MAX_CSR_CHARS, IssueCertificate
from helpers.csr import csr_der, der_to_pem, make_csr, make_csr_obj, make_key

PROFILES = load_profiles(SHIPPED_PROFILES_PATH)
REQUEST_ID = "f" * 32
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(csr_pem: str, profile: str = "tls-server") -> HapkiError | None:
    """Run approve; return the HapkiError it raised, or None. Any other exception fails the test."""
    request = IssueCertificate(csr_pem=csr_pem, profile=profile, requester="prop")
    try:
        approve(request, PROFILES, REQUEST_ID)
    except HapkiError as exc:
        assert exc.details, "every error names what was wrong"
        return exc
    return None


# --- garbage in ----------------------------------------------------------------------------------------------

ARMOUR = ("-----BEGIN CERTIFICATE REQUEST-----\n", "\n-----END CERTIFICATE REQUEST-----\n")


@PROPERTY
@given(st.text(max_size=2000))
def test_arbitrary_text_is_a_malformed_csr(text: str) -> None:
    error = outcome(text)
    assert isinstance(error, MalformedCSR)


@PROPERTY
@given(st.binary(max_size=2000), st.booleans())
def test_arbitrary_bytes_as_base64_or_pem_are_a_malformed_csr(data: bytes, armoured: bool) -> None:
    text = der_to_pem(data) if armoured else base64.b64encode(data).decode("ascii")
    assert isinstance(outcome(text[:MAX_CSR_CHARS]), MalformedCSR)


@PROPERTY
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=500))
def test_arbitrary_text_inside_pem_armour_is_a_malformed_csr(body: str) -> None:
    assert isinstance(outcome(ARMOUR[0] + body + ARMOUR[1]), MalformedCSR)


# --- valid CSRs, mutated -------------------------------------------------------------------------------------

SEEDS = [
    csr_der(make_csr(["a.example.com", "10.0.0.1"], cn="a.example.com", key=make_key(kind))[0])
    for kind in ("p256", "p384", "rsa2048", "ed25519")
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed DER with 1..4 byte flips, overwrites, insertions or deletions."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            data[position] = draw(st.integers(0, 255))
        elif operation == "insert":
            data.insert(position, draw(st.integers(0, 255)))
        else:
            del data[position]
    return bytes(data)


@PROPERTY
@given(mutated(SEEDS), st.sampled_from(["tls-server", "tls-client"]))
def test_mutated_csrs_give_an_approval_or_a_hapki_error(der: bytes, profile: str) -> None:
    outcome(der_to_pem(der), profile)


# Mutating the signed body and then re-signing it gets the mutations past the signature check, into the key,
# subject and extension parsers and the name rules.
_KEY = make_key("p256")
_TEMPLATE = make_csr_obj(["a.example.com", "10.0.0.1", "*.svc.internal"], cn="a.example.com", key=_KEY)
_TBS = _TEMPLATE.tbs_certrequest_bytes
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def _der(tag: int, body: bytes) -> bytes:
    """One DER TLV (definite length)."""
    size = len(body)
    if size < 128:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _resign(tbs: bytes) -> bytes:
    signature = _KEY.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + _ECDSA_SHA256 + _der(0x03, b"\x00" + signature))


def test_resigning_helper_builds_a_valid_csr() -> None:
    assert outcome(der_to_pem(_resign(_TBS))) is None


@PROPERTY
@given(mutated([_TBS]), st.sampled_from(["tls-server", "tls-client"]))
def test_mutated_and_resigned_csrs_give_an_approval_or_a_hapki_error(tbs: bytes, profile: str) -> None:
    outcome(der_to_pem(_resign(tbs)), profile)


# --- DNS names from the grammar ------------------------------------------------------------------------------

_LABEL = st.from_regex(r"\A[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\Z").filter(
    lambda label: label[2:4] != "--"  # reserved R-LDH form, only valid as a real xn-- A-label
)
_ALLOWED = ["example.com", "example.org", "internal", "test"]


@st.composite
def dns_names_under_allowed_domains(draw: st.DrawFn) -> str:
    """1..3 labels of up to 63 characters under an allowed domain (at most 203 characters), maybe a wildcard."""
    labels = draw(st.lists(_LABEL, min_size=1, max_size=3))
    name = ".".join([*labels, draw(st.sampled_from(_ALLOWED))])
    if draw(st.booleans()) and name.count(".") >= 2:
        name = "*." + name.partition(".")[2]
    return name


@PROPERTY
@given(st.lists(dns_names_under_allowed_domains(), min_size=1, max_size=5))
def test_grammar_dns_names_under_allowed_domains_are_accepted(dns_names: list[str]) -> None:
    approved = approve(
        IssueCertificate(csr_pem=make_csr(dns_names)[0], profile="tls-server", requester="prop"),
        PROFILES,
        REQUEST_ID,
    )
    assert approved.dns_names == list(dict.fromkeys(name.lower() for name in dns_names))


_LOCAL_PART = st.from_regex(r"\A[A-Za-z0-9_+-]{1,20}(\.[A-Za-z0-9_+-]{1,20}){0,2}\Z")


@PROPERTY
@given(_LOCAL_PART, st.lists(_LABEL, max_size=2), st.sampled_from(_ALLOWED))
def test_grammar_emails_under_allowed_domains_are_accepted(local: str, labels: list[str], domain: str) -> None:
    email = f"{local}@{'.'.join([*labels, domain])}"
    approved = approve(
        IssueCertificate(csr_pem=make_csr([email])[0], profile="tls-client", requester="prop"),
        PROFILES,
        REQUEST_ID,
    )
    local_part, _, email_domain = email.partition("@")
    assert approved.emails == [f"{local_part}@{email_domain.lower()}"]


@PROPERTY
@given(st.lists(_LABEL, min_size=1, max_size=6))
def test_valid_label_sequences_normalise_to_lowercase(labels: list[str]) -> None:
    name = ".".join([*labels, "test"])
    if len(name) > names.MAX_DNS_NAME_LENGTH:
        return
    assert names.normalize_dns_name(name) == name.lower()


@PROPERTY
@given(st.text(max_size=300))
def test_name_rules_raise_only_invalid_name(text: str) -> None:
    for rule in (names.normalize_dns_name, names.normalize_email, names.parse_ip):
        try:
            normal = rule(text)
        except InvalidName as exc:
            assert exc.details["reason"]
            continue
        # Normalisation is idempotent.
        assert str(rule(str(normal))) == str(normal)
