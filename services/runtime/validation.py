"""What is checked before the CA signs: profile, CSR syntax, key policy, proof of possession, names.

`approve` turns an IssueCertificate into the SignCertificate CLM sends the CA, or raises the HapkiError that
says why not. `recheck` is the CA's side: the same rules, applied again to what arrived on the bus. Pure and
synchronous: no I/O, no clock, linear in the size of the request. Shared by CLM and CARA (services never import
each other), so both enforce one set of rules.
"""

from __future__ import annotations

import base64
import binascii
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding

from hapki.runtime import names
from hapki.runtime.approval import APPROVAL_FIELDS
from hapki.runtime.profiles import Profile
from pydantic import ValidationError

from hapki.contracts.errors import (
    BadCSRSignature,
    ForbiddenName,
    HapkiError,
    KeyPolicyViolation,
    MalformedCSR,
    MessageTooLarge,
    PolicyViolation,
    UnknownProfile,
)
from hapki.contracts.models import MAX_CSR_CHARS, MAX_REQUEST_BYTES, IssueCertificate, SignCertificate

RSA_EXPONENT = 65537

# Everything cryptography raises on a CSR it cannot parse (found by fuzzing, see the property tests).
_PARSE_ERRORS = (ValueError, TypeError, x509.DuplicateExtension, x509.InvalidVersion)

_KEY_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (ed25519.Ed25519PublicKey, "ed25519"),
    (ed448.Ed448PublicKey, "ed448"),
    (dsa.DSAPublicKey, "dsa"),
    (x25519.X25519PublicKey, "x25519"),
    (x448.X448PublicKey, "x448"),
)


def check_message_size(raw: bytes) -> None:
    """Raise MessageTooLarge if a raw request body is over MAX_REQUEST_BYTES; call it before parsing."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise MessageTooLarge(
            f"request is {len(raw)} bytes, the limit is {MAX_REQUEST_BYTES}",
            {"field": "body", "size": len(raw), "limit": MAX_REQUEST_BYTES},
        )


def approve(request: IssueCertificate, profiles: Mapping[str, Profile], request_id: str, *,
            verified_csr: x509.CertificateSigningRequest | None = None) -> SignCertificate:
    """Check a request against its profile; return the SignCertificate for the CA or raise a HapkiError.

    `request_id` must be 32 lowercase hex digits (the caller allocates it); a bad one is a programming error
    and raises pydantic's ValidationError. `verified_csr`: the request's CSR already parsed from
    `request.csr_pem` and its self-signature verified by the caller (CARA's issuance.parse_csr), so neither is
    done twice; every other check runs on it as on a CSR parsed here.
    """
    # Step 1: the profile decides everything else.
    profile = profiles.get(request.profile)
    if profile is None:
        raise UnknownProfile(
            f"no certificate profile {request.profile!r}",
            {"field": "profile", "value": request.profile[: names.DETAIL_CHARS], "known": sorted(profiles)},
        )
    # Step 2: parse, forcing every lazily parsed part now so later steps see only well-formed data.
    csr = _parse_csr(request.csr_pem) if verified_csr is None else _inspect(verified_csr)
    # Step 3: key policy before signature verification: it is cheaper, and odd keys never reach the verifier.
    key_kind = _check_key(csr.csr, profile)
    # Step 4: proof of possession of the private key.
    if verified_csr is None:
        _check_signature(csr.csr)
    # Step 5: names, syntax then profile policy.
    approved = names.approve_names(csr.subject, csr.sans, profile)
    return SignCertificate(
        request_id=request_id,
        profile=profile.name,
        csr_pem=csr.csr.public_bytes(Encoding.PEM).decode("ascii"),
        common_name=approved.common_name,
        dns_names=list(approved.dns),
        ip_addresses=[str(address) for address in approved.ips],
        emails=list(approved.emails),
        validity_seconds=profile.validity_seconds,
        key_usage=[
            *profile.key_usage,
            *(profile.rsa_key_usage if key_kind == "rsa" else profile.ec_key_usage),
        ],
        extended_key_usage=list(profile.extended_key_usage),
    )


def recheck(request: SignCertificate, profiles: Mapping[str, Profile], *,
            verified_csr: x509.CertificateSigningRequest | None = None) -> None:
    """The CA's own check: approve the request's CSR again under its profile; the result must be this request.

    So the CA signs only what its copy of the profiles allows for this CSR (names, forms, domains, networks, count,
    key type and size, validity, usages), even when the approval key was stolen or CLM has a bug. Raises
    PolicyViolation naming the refusal (the code approve gave) or the fields that differ. `verified_csr`: as for
    approve (the CSR of `request.csr_pem`, parsed and its signature verified by the caller).
    """
    try:
        expected = approve(
            IssueCertificate(csr_pem=request.csr_pem, profile=request.profile, requester="cara"), profiles,
            request.request_id, verified_csr=verified_csr,
        )
    except HapkiError as exc:
        raise PolicyViolation(
            f"the CA's profile check refuses request {request.request_id}: {exc.message}",
            {"request_id": request.request_id, "refused": {"code": exc.code.value, **exc.details}},
        ) from None
    except ValidationError:  # e.g. an empty profile name, which IssueCertificate does not allow
        raise PolicyViolation(f"request {request.request_id} names no valid profile",
                              {"request_id": request.request_id, "field": "profile"}) from None
    differing = sorted(name for name in SignCertificate.model_fields
                       if name not in APPROVAL_FIELDS and getattr(expected, name) != getattr(request, name))
    if differing:
        raise PolicyViolation(
            f"request {request.request_id} asks for other content than profile {request.profile!r} gives this CSR: "
            f"{', '.join(differing)}",
            {"request_id": request.request_id, "fields": differing},
        )


def is_well_formed(csr_pem: str) -> bool:
    """Whether the CSR parses and its self-signature verifies (proof of possession).

    What decides if a refusal is audited: a refusal of such a request is a policy decision worth recording;
    garbage (unparseable, or no proof of possession) is only logged, since auditing it would let anyone on the
    bus fill the audit log at the cost of sending junk.
    """
    try:
        _check_signature(_parse_csr(csr_pem).csr)
    except HapkiError:
        return False
    return True


# --- parsing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedCSR:
    csr: x509.CertificateSigningRequest
    subject: list[x509.NameAttribute]
    sans: list[x509.GeneralName] | None  # None: no subjectAltName extension at all


def _malformed(reason: str) -> MalformedCSR:
    return MalformedCSR(f"malformed CSR: {reason}", {"field": "csr_pem", "reason": reason[: names.DETAIL_CHARS]})


def _parse_csr(text: str) -> _ParsedCSR:
    """Parse a PKCS#10 request from PEM, or from base64 DER when there is no PEM armour."""
    if len(text) > MAX_CSR_CHARS:  # the contract caps it; this guards callers that skipped validation
        raise MessageTooLarge(
            f"CSR is {len(text)} characters, the limit is {MAX_CSR_CHARS}",
            {"field": "csr_pem", "size": len(text), "limit": MAX_CSR_CHARS},
        )
    if not text.isascii():
        raise _malformed("non-ASCII characters")
    text = text.strip()
    if not text:
        raise _malformed("empty")
    try:
        if "-----BEGIN" in text:
            csr = x509.load_pem_x509_csr(text.encode("ascii"))
        else:
            try:
                der = base64.b64decode("".join(text.split()), validate=True)
            except binascii.Error as exc:
                raise _malformed(f"neither PEM nor base64 DER: {exc}") from None
            csr = x509.load_der_x509_csr(der)
    except _PARSE_ERRORS as exc:
        raise _malformed(f"not a PKCS#10 request: {exc}") from None
    return _inspect(csr)


def _inspect(csr: x509.CertificateSigningRequest) -> _ParsedCSR:
    """Subject and subjectAltNames of a loaded CSR, every lazily parsed part forced now (MalformedCSR if bad)."""
    try:
        # cryptography warns (UserWarning) about a CN over 64 characters or a 3-letter country. Our own rules
        # refuse both with a precise error; silenced, so `-W error` cannot turn them into another exception.
        # (catch_warnings is process-wide state; approve runs on the event loop's one thread.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            subject = list(csr.subject)
    except _PARSE_ERRORS as exc:
        raise _malformed(f"subject: {exc}") from None
    try:
        extensions = csr.extensions
    except x509.UnsupportedGeneralNameType as exc:
        # A GeneralName form cryptography cannot even represent (x400Address, ediPartyName): well-formed, refused.
        raise ForbiddenName(
            f"unsupported subjectAltName type: {exc}",
            {"field": "san", "name": None, "reason": f"unsupported subjectAltName type: {exc}"},
        ) from None
    except _PARSE_ERRORS as exc:
        raise _malformed(f"extensions: {exc}") from None
    sans = None
    for extension in extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            sans = list(extension.value)
    return _ParsedCSR(csr=csr, subject=subject, sans=sans)


# --- key and signature ------------------------------------------------------------------------------------


def _check_key(csr: x509.CertificateSigningRequest, profile: Profile) -> str:
    """Refuse a subject key the profile does not allow; return "ec" or "rsa"."""
    allowed = {
        "ec_curves": list(profile.ec_curves),
        "rsa_bits": [profile.rsa_min_bits, profile.rsa_max_bits] if profile.allow_rsa else None,
        "rsa_exponent": RSA_EXPONENT if profile.allow_rsa else None,
    }

    def refuse(reason: str, **found: object) -> KeyPolicyViolation:
        return KeyPolicyViolation(
            f"key not allowed by profile {profile.name!r}: {reason}",
            {"field": "csr_pem", **found, "reason": reason, "allowed": allowed},
        )

    try:
        key = csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise refuse(f"unsupported key algorithm: {exc}", key_type="unknown") from None
    except _PARSE_ERRORS as exc:
        raise _malformed(f"public key: {exc}") from None

    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = key.curve.name
        if curve not in profile.ec_curves:
            raise refuse(f"EC curve {curve} is not allowed", key_type="ec", curve=curve)
        return "ec"
    if isinstance(key, rsa.RSAPublicKey):
        bits, exponent = key.key_size, key.public_numbers().e
        if not profile.allow_rsa:
            raise refuse("RSA keys are not allowed", key_type="rsa", key_size=bits)
        if not profile.rsa_min_bits <= bits <= profile.rsa_max_bits:
            raise refuse(
                f"RSA-{bits} is outside {profile.rsa_min_bits}..{profile.rsa_max_bits} bits",
                key_type="rsa",
                key_size=bits,
            )
        if exponent != RSA_EXPONENT:
            # Only the exponent is echoed, and only when small: a huge one is someone's fuzzing, not a key.
            shown = exponent if exponent.bit_length() <= 64 else f"{exponent.bit_length()}-bit"
            raise refuse(f"RSA public exponent must be {RSA_EXPONENT}", key_type="rsa", key_size=bits, exponent=shown)
        return "rsa"
    key_type = next((label for cls, label in _KEY_TYPE_NAMES if isinstance(key, cls)), type(key).__name__)
    raise refuse(f"{key_type} keys are not allowed", key_type=key_type)


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    """Refuse a CSR whose self-signature does not verify with its own public key."""
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, *_PARSE_ERRORS) as exc:
        raise BadCSRSignature(
            f"CSR signature cannot be verified: {exc}", {"field": "csr_pem", "reason": str(exc)[: names.DETAIL_CHARS]}
        ) from None
    if not valid:
        raise BadCSRSignature(
            "CSR signature does not verify with its public key",
            {"field": "csr_pem", "reason": "signature does not verify"},
        )
