"""HSMPrivateKey against a software signer: the builders accept it and its signatures verify."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hapki.contracts.errors import Internal
from hapki.runtime.hsm_key import HSMPrivateKey, SignMechanism

NOW = datetime(2025, 1, 1, tzinfo=UTC)
KEY_ID = bytes.fromhex("00112233445566778899aabbccddeeff")


class SoftwareSigner:
    """Stands in for the HSM pool: raw ECDSA over a digest, r || s padded to the field size."""

    def __init__(self, curve: ec.EllipticCurve) -> None:
        self.key = ec.generate_private_key(curve)
        self.digests: list[bytes] = []

    def sign_digest(self, key_id: bytes, mechanism: SignMechanism, digest: bytes) -> bytes:
        assert key_id == KEY_ID
        assert mechanism is SignMechanism.ECDSA
        self.digests.append(digest)
        # Any hash of the right size will do for Prehashed: the curve truncates digests the same way.
        prehash = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}[len(digest)]
        r, s = decode_dss_signature(self.key.sign(digest, ec.ECDSA(Prehashed(prehash))))
        size = (self.key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _hsm_key(curve: ec.EllipticCurve) -> tuple[HSMPrivateKey, SoftwareSigner]:
    signer = SoftwareSigner(curve)
    return HSMPrivateKey(signer, KEY_ID, signer.key.public_key()), signer


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.mark.parametrize(
    ("curve", "algorithm"),
    [(ec.SECP256R1(), hashes.SHA256()), (ec.SECP384R1(), hashes.SHA384()), (ec.SECP256R1(), hashes.SHA384())],
)
def test_certificate_builder_signs_through_the_signer(curve: ec.EllipticCurve, algorithm: hashes.HashAlgorithm) -> None:
    key, signer = _hsm_key(curve)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ca"))
        .issuer_name(_name("ca"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, algorithm)
    )
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.signature_hash_algorithm, type(algorithm))
    # The host hashed the TBS bytes; the signer saw exactly that digest.
    hasher = hashes.Hash(algorithm)
    hasher.update(cert.tbs_certificate_bytes)
    assert signer.digests == [hasher.finalize()]


def test_crl_csr_and_ocsp_builders_accept_the_key() -> None:
    key, _ = _hsm_key(ec.SECP256R1())
    public = key.public_key()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(_name("ca"))
        .last_update(NOW)
        .next_update(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert crl.is_signature_valid(public)

    csr = x509.CertificateSigningRequestBuilder().subject_name(_name("ca")).sign(key, hashes.SHA256())
    assert csr.is_signature_valid

    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ca"))
        .issuer_name(_name("ca"))
        .public_key(public)
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert, issuer=cert, algorithm=hashes.SHA256(), cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=NOW, next_update=NOW + timedelta(hours=1), revocation_time=None, revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
        .sign(key, hashes.SHA256())
    )
    public.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


def test_prehashed_digest_goes_to_the_signer_unchanged() -> None:
    key, signer = _hsm_key(ec.SECP256R1())
    digest = bytes(range(32))
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    key.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert signer.digests == [digest]
    with pytest.raises(ValueError, match="32 bytes"):
        key.sign(digest[:20], ec.ECDSA(Prehashed(hashes.SHA256())))


def test_key_reports_its_curve_and_copies_are_the_same_handle() -> None:
    key, _ = _hsm_key(ec.SECP384R1())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    assert key.key_size == 384
    assert key.key_id == KEY_ID
    assert copy.copy(key) is key
    assert copy.deepcopy(key) is key
    assert KEY_ID.hex() in repr(key)


def test_private_material_and_ecdh_are_refused() -> None:
    key, _ = _hsm_key(ec.SECP256R1())
    with pytest.raises(TypeError, match="non-extractable"):
        key.private_numbers()
    with pytest.raises(TypeError, match="non-extractable"):
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(TypeError, match="sign-only"):
        key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())


def test_deterministic_ecdsa_is_refused() -> None:
    key, signer = _hsm_key(ec.SECP256R1())
    with pytest.raises(UnsupportedAlgorithm):
        key.sign(b"data", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    assert signer.digests == []


def test_signature_of_wrong_length_from_the_hsm_is_an_internal_error() -> None:
    class ShortSigner:
        def sign_digest(self, key_id: bytes, mechanism: SignMechanism, digest: bytes) -> bytes:
            return b"\x01" * 63

    key = HSMPrivateKey(ShortSigner(), KEY_ID, ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(Internal):
        key.sign(b"data", ec.ECDSA(hashes.SHA256()))


def test_constructor_rejects_non_ec_public_keys_and_empty_ids() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    signer = SoftwareSigner(ec.SECP256R1())
    with pytest.raises(TypeError):
        HSMPrivateKey(signer, KEY_ID, ed25519.Ed25519PrivateKey.generate().public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HSMPrivateKey(signer, b"", signer.key.public_key())
