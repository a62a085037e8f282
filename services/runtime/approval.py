"""CLM's approval of a signing request: a signature the CA checks before it does anything else.

CLM signs, with a private key only CLM holds (a PEM file readable by the service user only), the canonical bytes
of every field of a SignCertificate except the two approval fields; the CSR enters by its SHA-256. CARA holds the
public keys it trusts (a list, so keys can be rotated: add the new public key to every CARA member, switch CLM to
the new private key, then drop the old public key) and refuses a request whose approval is missing, names a key
it does not trust or does not verify: publish rights on the bus are not enough to get a certificate signed.

Why a signature and not a MAC: CARA then holds nothing that can approve; a copy of CARA's config approves nothing.
Why every field rather than a list: whatever the CA uses to build the certificate is covered, including fields
added to SignCertificate later (they are in the model dump without a change here).

The algorithm is the key's: ECDSA P-256 with SHA-256 and deterministic nonces (RFC 6979), which new keys use, or
Ed25519, which keys made before it use and which stay valid. Both sign deterministically (the same request gives
the same approval) and the verifier takes the algorithm from the trusted key the id names, never from the message.
P-256 because it is the cheaper of the two on the issuance path: in the OpenSSL of the cryptography wheel it
signs in about 32 us and verifies in about 70 us, Ed25519 in about 46 and 134 us (docs/PERFORMANCE-HISTORY.md, session 16).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hapki.contracts.errors import ApprovalInvalid
from hapki.contracts.models import SignCertificate
from hapki.runtime.config import require_owner_only

# Domain separation: these bytes can never be mistaken for another hapki signature's input (or a later version's).
DOMAIN = b"hapki.approval.v1\n"
APPROVAL_FIELDS = frozenset({"approval", "approval_key_id"})

Algorithm = Literal["p256", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("p256", "ed25519")  # the first is what new keys use
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_SIGN_P256 = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERIFY_P256 = ec.ECDSA(hashes.SHA256())


def approval_payload(request: SignCertificate) -> bytes:
    """The bytes an approval signs: DOMAIN + canonical JSON of every non-approval field, the CSR as its SHA-256.

    Canonical JSON: sorted keys, no spaces, ASCII only; lists keep their order (it is the certificate's order).
    """
    fields = request.model_dump(mode="json", exclude=APPROVAL_FIELDS)
    assert "csr_sha256" not in fields, "a SignCertificate field named csr_sha256 would be ambiguous here"
    fields["csr_sha256"] = hashlib.sha256(fields.pop("csr_pem").encode("utf-8")).hexdigest()
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _unsupported(key: object) -> str | None:
    """Why this key cannot approve (None: it can): only P-256 and Ed25519 keys, private or public."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return None
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return None if isinstance(key.curve, ec.SECP256R1) else f"an EC key on {key.curve.name}, not P-256"
    return f"a {type(key).__name__}, not a P-256 or Ed25519 key"


def key_id(public_key: PublicKey) -> str:
    """The id an approval names its key by: the first 8 bytes of SHA-256 of the raw public key, in hex.

    Raw: Ed25519's 32 bytes; a P-256 key's uncompressed point (X9.62, 65 bytes).
    """
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return hashlib.sha256(raw).hexdigest()[:16]


def _new_key(algorithm: Algorithm) -> PrivateKey:
    if algorithm == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"no approval algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")


class ApprovalKey:
    """CLM's private approval key: signs the SignCertificate messages CLM sends the CA."""

    def __init__(self, private_key: PrivateKey) -> None:
        unsupported = _unsupported(private_key)
        if unsupported:
            raise ValueError(f"a CLM approval key must be P-256 or Ed25519, not {unsupported}")
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def generate(cls, algorithm: Algorithm = ALGORITHMS[0]) -> ApprovalKey:
        """A fresh key in memory (tests; `generate_key_files` for real keys)."""
        return cls(_new_key(algorithm))

    @classmethod
    def from_file(cls, path: Path) -> ApprovalKey:
        """Load a PEM (PKCS#8) P-256 or Ed25519 private key; ValueError if others can read the file or it holds none."""
        try:
            require_owner_only(path, "CLM approval key file")
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the CLM approval key file {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            raise ValueError(f"CLM approval key file {path} holds no unencrypted PEM private key") from None
        unsupported = _unsupported(key)
        if unsupported:
            raise ValueError(f"CLM approval key file {path} holds {unsupported}")
        return cls(key)

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign(self, request: SignCertificate) -> SignCertificate:
        """The same request with this key's approval over it (deterministic: the same request, the same approval)."""
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            signature = self._key.sign(approval_payload(request), _SIGN_P256)
        else:
            signature = self._key.sign(approval_payload(request))
        return request.model_copy(update={"approval": base64.b64encode(signature).decode("ascii"),
                                          "approval_key_id": self.key_id})


class ApprovalVerifier:
    """The CA side: the CLM approval public keys it trusts, by key id."""

    def __init__(self, public_keys: Iterable[PublicKey]) -> None:
        self._keys = {key_id(key): key for key in public_keys}
        for key in self._keys.values():
            unsupported = _unsupported(key)
            if unsupported:
                raise ValueError(f"a CLM approval public key must be P-256 or Ed25519, not {unsupported}")
        if not self._keys:
            raise ValueError("at least one trusted CLM approval public key is needed")

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> ApprovalVerifier:
        """Load PEM (SubjectPublicKeyInfo) P-256 or Ed25519 public keys; ValueError naming the file that is not one."""
        keys = []
        for path in paths:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except OSError as exc:
                raise ValueError(f"cannot read the CLM approval public key {path}: {exc.strerror}") from None
            except (ValueError, UnsupportedAlgorithm):
                raise ValueError(f"{path} holds no PEM public key") from None
            unsupported = _unsupported(key)
            if unsupported:
                raise ValueError(f"{path} holds {unsupported}")
            keys.append(key)
        return cls(keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, request: SignCertificate) -> None:
        """Return if the request carries a valid approval by a trusted key; raise ApprovalInvalid otherwise."""

        def refuse(reason: str) -> ApprovalInvalid:
            return ApprovalInvalid(
                f"signing request {request.request_id} refused: {reason}",
                {"request_id": request.request_id, "reason": reason, "approval_key_id": request.approval_key_id},
            )

        if request.approval is None or request.approval_key_id is None:
            raise refuse("no CLM approval (a request queued before approvals existed, or not sent by CLM)")
        key = self._keys.get(request.approval_key_id)
        if key is None:
            raise refuse("approved by a key this CA does not trust")
        try:
            signature = base64.b64decode(request.approval, validate=True)
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, approval_payload(request), _VERIFY_P256)
            else:
                key.verify(signature, approval_payload(request))
        except (binascii.Error, InvalidSignature):
            raise refuse("the approval does not verify over this content") from None


def generate_key_files(private_path: Path, public_path: Path, algorithm: Algorithm = ALGORITHMS[0]) -> str:
    """Create a new approval key pair: the private key (PEM, mode 0600, never overwritten) and its public key.

    Returns the key id. Raises FileExistsError if the private key file exists already.
    """
    key = _new_key(algorithm)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the first byte on
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = public_path.with_name(public_path.name + ".tmp")
    tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    tmp.replace(public_path)
    return key_id(key.public_key())
