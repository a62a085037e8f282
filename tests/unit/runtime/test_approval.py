"""CLM's approval of signing requests: canonical bytes, signing, verification, key files; the CA's profile re-check."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from hapki.contracts.errors import ApprovalInvalid, ErrorCode, PolicyViolation
from hapki.contracts.models import IssueCertificate, SignCertificate
from hapki.runtime import approval
from hapki.runtime.approval import (
    ALGORITHMS,
    Algorithm,
    ApprovalKey,
    ApprovalVerifier,
    approval_payload,
    generate_key_files,
)
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.validation import approve, recheck
from helpers.csr import make_csr, make_key

PROFILES = load_profiles(SHIPPED_PROFILES_PATH)
REQUEST_ID = "ab" * 16


def _approved(names: list[str] | None = None, profile: str = "tls-server", key: str = "p256") -> SignCertificate:
    names = names or ["www.example.com", "api.example.com", "192.0.2.10"]
    csr_pem, _ = make_csr(names, key=make_key(key), cn=names[0])
    return approve(IssueCertificate(csr_pem=csr_pem, profile=profile, requester="tests"), PROFILES, REQUEST_ID)


# One tampered value per field that is not an approval field: every one must break the approval.
TAMPERED: dict[str, Any] = {
    "request_id": "cd" * 16,
    "profile": "tls-client",
    "csr_pem": None,  # filled in below: another valid CSR
    "common_name": "api.example.com",
    "dns_names": ["www.example.com", "evil.example.com"],
    "ip_addresses": ["192.0.2.11"],
    "emails": ["ops@example.com"],
    "validity_seconds": 398 * 86400,
    "key_usage": ["digital_signature", "key_cert_sign"],
    "extended_key_usage": ["server_auth", "client_auth"],
}


def test_every_field_but_the_approval_is_covered() -> None:
    """A field added to SignCertificate later must get a tampering case here (and is covered by the payload)."""
    assert set(TAMPERED) == set(SignCertificate.model_fields) - approval.APPROVAL_FIELDS


# The DER of an ECDSA P-256 signature is 8 to 72 bytes (70-72 but for rare short r or s); Ed25519's is 64.
SIGNATURE_BYTES = {"p256": range(8, 73), "ed25519": range(64, 65)}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_signed_request_verifies_and_the_payload_is_canonical(algorithm: Algorithm) -> None:
    key, base = ApprovalKey.generate(algorithm), _approved()
    signed = key.sign(base)
    assert signed.approval_key_id == key.key_id
    assert len(base64.b64decode(signed.approval or "")) in SIGNATURE_BYTES[algorithm]
    assert key.sign(base) == signed  # deterministic: a request approved again gets the same approval
    ApprovalVerifier([key.public_key()]).verify(signed)
    # Survives the wire and the database (JSON round trip), and the payload does not depend on the approval.
    again = SignCertificate.model_validate_json(signed.model_dump_json())
    ApprovalVerifier([key.public_key()]).verify(again)
    assert approval_payload(again) == approval_payload(base)
    assert approval_payload(again).startswith(approval.DOMAIN)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_tampering_with_any_covered_field_is_refused(field: str, algorithm: Algorithm) -> None:
    key = ApprovalKey.generate(algorithm)
    signed = key.sign(_approved())
    value = TAMPERED[field]
    if field == "csr_pem":
        value = make_csr(["www.example.com"], key=make_key("p384"), cn="www.example.com")[0]
    assert getattr(signed, field) != value
    forged = SignCertificate.model_validate({**signed.model_dump(), field: value})
    with pytest.raises(ApprovalInvalid) as caught:
        ApprovalVerifier([key.public_key()]).verify(forged)
    assert caught.value.code is ErrorCode.APPROVAL_INVALID
    assert caught.value.details["reason"] == "the approval does not verify over this content"


def test_a_missing_approval_is_refused() -> None:
    key = ApprovalKey.generate()
    for unsigned in (_approved(), key.sign(_approved()).model_copy(update={"approval_key_id": None}),
                     key.sign(_approved()).model_copy(update={"approval": None})):
        with pytest.raises(ApprovalInvalid, match="no CLM approval"):
            ApprovalVerifier([key.public_key()]).verify(unsigned)


@pytest.mark.parametrize(("trusted_algorithm", "stranger_algorithm"),
                         [(a, b) for a in ALGORITHMS for b in ALGORITHMS])
def test_an_approval_by_an_untrusted_key_is_refused_even_under_a_trusted_key_id(
        trusted_algorithm: Algorithm, stranger_algorithm: Algorithm) -> None:
    """Also across algorithms: the trusted key decides how a signature is checked, never the message."""
    trusted = ApprovalKey.generate(trusted_algorithm)
    stranger = ApprovalKey.generate(stranger_algorithm)
    verifier = ApprovalVerifier([trusted.public_key()])
    by_stranger = stranger.sign(_approved())
    with pytest.raises(ApprovalInvalid, match="does not trust"):
        verifier.verify(by_stranger)
    # The stranger's signature presented under the trusted key's id.
    with pytest.raises(ApprovalInvalid, match="does not verify"):
        verifier.verify(by_stranger.model_copy(update={"approval_key_id": trusted.key_id}))
    garbage = trusted.sign(_approved()).model_copy(update={"approval": base64.b64encode(os.urandom(64)).decode()})
    with pytest.raises(ApprovalInvalid, match="does not verify"):
        verifier.verify(garbage)
    short = trusted.sign(_approved()).model_copy(update={"approval": "AAAA"})
    with pytest.raises(ApprovalInvalid, match="does not verify"):
        verifier.verify(short)


def test_rotation_trusts_every_listed_key() -> None:
    """Also from a key of the earlier algorithm (Ed25519) to one of the current (P-256)."""
    old, new = ApprovalKey.generate("ed25519"), ApprovalKey.generate("p256")
    verifier = ApprovalVerifier([old.public_key(), new.public_key()])
    assert verifier.key_ids == sorted([old.key_id, new.key_id])
    verifier.verify(old.sign(_approved()))
    verifier.verify(new.sign(_approved()))
    with pytest.raises(ValueError):
        ApprovalVerifier([])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_key_files_private_0600_never_overwritten_and_checked(tmp_path: Path, algorithm: Algorithm) -> None:
    private, public = tmp_path / "k" / "clm.key", tmp_path / "k" / "clm.pub"
    kid = generate_key_files(private, public, algorithm)
    assert private.stat().st_mode & 0o777 == 0o600
    key = ApprovalKey.from_file(private)
    assert key.key_id == kid
    ApprovalVerifier.from_files([public]).verify(key.sign(_approved()))
    with pytest.raises(FileExistsError):
        generate_key_files(private, public)
    private.chmod(0o640)
    with pytest.raises(ValueError, match="accessible to group or others"):
        ApprovalKey.from_file(private)
    with pytest.raises(ValueError, match="cannot read"):
        ApprovalKey.from_file(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="no PEM public key"):
        ApprovalVerifier.from_files([private])  # a private key is not a public key file
    not_a_key = tmp_path / "junk.key"
    not_a_key.write_text("junk")
    not_a_key.chmod(0o600)
    with pytest.raises(ValueError, match="no unencrypted PEM private key"):
        ApprovalKey.from_file(not_a_key)


def test_new_keys_are_p256_and_other_kinds_of_key_cannot_approve(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = tmp_path / "clm.key", tmp_path / "clm.pub"
    generate_key_files(private, public)
    loaded = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(loaded, ec.EllipticCurvePublicKey) and loaded.curve.name == "secp256r1"
    assert isinstance(ApprovalKey.generate().public_key(), ec.EllipticCurvePublicKey)
    with pytest.raises(ValueError, match="no approval algorithm"):
        ApprovalKey.generate("rsa")

    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="EC key on secp384r1, not P-256"):
        ApprovalKey(p384)
    with pytest.raises(ValueError, match="EC key on secp384r1, not P-256"):
        ApprovalVerifier([p384.public_key()])
    for kind, pem in (("private", p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())),
                      ("public", p384.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))):
        path = tmp_path / f"p384.{kind}"
        path.write_bytes(pem)
        path.chmod(0o600)
        with pytest.raises(ValueError, match=f"{path} holds an EC key on secp384r1"):
            ApprovalKey.from_file(path) if kind == "private" else ApprovalVerifier.from_files([path])
    rsa_pem = make_key("rsa2048").private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
    rsa_path = tmp_path / "rsa.key"
    rsa_path.write_bytes(rsa_pem)
    rsa_path.chmod(0o600)
    with pytest.raises(ValueError, match="not a P-256 or Ed25519 key"):
        ApprovalKey.from_file(rsa_path)


# --- the CA's own re-check --------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "names", "key"), [
    ("tls-server", ["www.example.com", "*.example.org", "10.1.2.3", "2001:db8::1"], "p256"),
    ("tls-server", ["rsa.example.net"], "rsa2048"),
    ("tls-client", ["device.internal", "ops@example.com"], "p384"),
])
def test_recheck_accepts_what_clm_approves(profile: str, names: list[str], key: str) -> None:
    recheck(_approved(names, profile, key), PROFILES)


@pytest.mark.parametrize(("change", "refusal"), [
    ({"dns_names": ["www.example.com", "www.evil.com"]}, "dns_names"),  # a name outside the profile's domains
    ({"common_name": "www.evil.com"}, "common_name"),
    ({"ip_addresses": ["8.8.8.8"]}, "ip_addresses"),  # a public address, outside the allowed networks
    ({"emails": ["ceo@example.com"]}, "emails"),  # tls-server allows no email names
    ({"validity_seconds": 7776000 + 1}, "validity_seconds"),  # above the profile's validity
    ({"key_usage": ["digital_signature", "key_cert_sign"]}, "key_usage"),  # a CA certificate
    ({"extended_key_usage": ["server_auth", "client_auth"]}, "extended_key_usage"),
    ({"profile": "tls-client"}, "common_name"),  # tls-client allows no IP names: refused outright
])
def test_recheck_refuses_content_the_profile_does_not_give(change: dict[str, Any], refusal: str) -> None:
    forged = SignCertificate.model_validate({**_approved().model_dump(), **change})
    with pytest.raises(PolicyViolation) as caught:
        recheck(forged, PROFILES)
    assert caught.value.code is ErrorCode.POLICY_VIOLATION
    details = caught.value.details
    assert details["request_id"] == REQUEST_ID
    assert refusal in details.get("fields", []) or details.get("refused", {}).get("code") == "FORBIDDEN_NAME"


def test_recheck_of_a_csr_the_ca_parsed_and_verified_once_decides_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """CARA hands recheck the CSR issuance.parse_csr loaded and verified: same answers, no second verification."""
    from cryptography import x509

    from hapki.cara.issuance import parse_csr
    from hapki.runtime import validation

    request = _approved(["www.example.com", "10.1.2.3"])
    csr = parse_csr(request)
    verified = []
    monkeypatch.setattr(validation, "_check_signature", lambda c: verified.append(c))
    recheck(request, PROFILES, verified_csr=csr)
    assert verified == []  # the signature was the caller's to verify, and it did
    assert approve(IssueCertificate(csr_pem=request.csr_pem, profile="tls-server", requester="cara"), PROFILES,
                   REQUEST_ID, verified_csr=csr) == approve(
        IssueCertificate(csr_pem=request.csr_pem, profile="tls-server", requester="cara"), PROFILES, REQUEST_ID)
    assert len(verified) == 1  # without a verified CSR, approve verifies
    forged = SignCertificate.model_validate({**request.model_dump(), "dns_names": ["www.example.com", "evil.com"]})
    with pytest.raises(PolicyViolation) as caught:
        recheck(forged, PROFILES, verified_csr=x509.load_pem_x509_csr(forged.csr_pem.encode()))
    assert caught.value.details["fields"] == ["dns_names"]


def test_recheck_refuses_an_unknown_profile_and_a_key_the_profile_refuses() -> None:
    with pytest.raises(PolicyViolation) as caught:
        recheck(SignCertificate.model_validate({**_approved().model_dump(), "profile": "root-ca"}), PROFILES)
    assert caught.value.details["refused"]["code"] == "UNKNOWN_PROFILE"
    with pytest.raises(PolicyViolation):
        recheck(SignCertificate.model_validate({**_approved().model_dump(), "profile": ""}), PROFILES)
    # A P-521 key: CLM never approves it; the CA refuses it whatever the names say.
    csr_pem, _ = make_csr(["www.example.com"], key=make_key("p521"), cn="www.example.com")
    forged = SignCertificate.model_validate({**_approved(["www.example.com"]).model_dump(), "csr_pem": csr_pem})
    with pytest.raises(PolicyViolation) as caught:
        recheck(forged, PROFILES)
    assert caught.value.details["refused"]["code"] == "KEY_POLICY_VIOLATION"
