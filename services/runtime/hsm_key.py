"""An EC private key object whose signatures are made by an HSM, for cryptography's builders.

cryptography has no "sign these TBS bytes" API; its documented extension point is a subclass of
`ec.EllipticCurvePrivateKey`. The certificate, CRL, OCSP and CSR builders call `key.sign(data, ECDSA(hash))`,
which this class routes to a `DigestSigner` (the HSM pool, or a fake in unit tests). This module knows nothing
about PKCS#11: which token, which member and failover live in `hapki.runtime.hsm`.
"""

from __future__ import annotations

import enum
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from hapki.contracts.errors import Internal


class SignMechanism(enum.Enum):
    """What the HSM does with the bytes it gets."""

    # Raw ECDSA (CKM_ECDSA) over a digest computed on the host; the HSM returns r || s, each padded to the
    # curve's field size. SoftHSM has no combined ECDSA-SHA256 mechanism, so hashing always happens here.
    ECDSA = "ecdsa"


class DigestSigner(Protocol):
    """The one call HSMPrivateKey needs: sign a digest with the key named by `key_id`."""

    def sign_digest(self, key_id: bytes, mechanism: SignMechanism, digest: bytes) -> bytes: ...


class HSMPrivateKey(ec.EllipticCurvePrivateKey):
    """A non-extractable EC key in an HSM, usable wherever cryptography accepts an EC private key for signing.

    `sign` blocks until the HSM answers; async callers run the builder in a thread (`asyncio.to_thread`, which
    also carries the caller's trace context into the `hsm.sign` span).
    """

    def __init__(self, signer: DigestSigner, key_id: bytes, public_key: ec.EllipticCurvePublicKey) -> None:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError(f"HSMPrivateKey needs an EC public key, got {type(public_key).__name__}")
        if not key_id:
            raise ValueError("key_id must not be empty")
        self._signer = signer
        self._key_id = bytes(key_id)
        self._public_key = public_key
        # r and s are each padded to the byte length of the curve order.
        self._scalar_len = (public_key.curve.key_size + 7) // 8

    @property
    def key_id(self) -> bytes:
        """CKA_ID of the key in the HSM."""
        return self._key_id

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """Hash `data` on the host, sign the digest in the HSM, return a DER ECDSA-Sig-Value."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("HSM keys sign with ECDSA only")
        if signature_algorithm.deterministic_signing:
            # The HSM chooses its own nonce; claiming RFC 6979 output would be a lie.
            raise UnsupportedAlgorithm("deterministic ECDSA (RFC 6979) is not available for HSM keys")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
            if len(digest) != algorithm.digest_size:
                raise ValueError(f"prehashed digest must be {algorithm.digest_size} bytes, got {len(digest)}")
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(data)
            digest = hasher.finalize()

        raw = self._signer.sign_digest(self._key_id, SignMechanism.ECDSA, digest)
        if len(raw) != 2 * self._scalar_len:
            raise Internal(
                "HSM returned an ECDSA signature of unexpected length",
                {"key_id": self._key_id.hex(), "length": len(raw), "expected": 2 * self._scalar_len},
            )
        r = int.from_bytes(raw[: self._scalar_len], "big")
        s = int.from_bytes(raw[self._scalar_len :], "big")
        return encode_dss_signature(r, s)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError("HSM keys are sign-only: ECDH is not allowed")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError("HSM keys are non-extractable: their private numbers never leave the HSM")

    def private_bytes(self, encoding, format, encryption_algorithm) -> bytes:  # noqa: A002 (cryptography's name)
        raise TypeError("HSM keys are non-extractable: they cannot be serialized")

    # The key object is a handle: copies must refer to the same HSM key, never duplicate material.
    def __copy__(self) -> HSMPrivateKey:
        return self

    def __deepcopy__(self, memo: dict) -> HSMPrivateKey:
        return self

    def __repr__(self) -> str:
        return f"<HSMPrivateKey {self.curve.name} id={self._key_id.hex()}>"
