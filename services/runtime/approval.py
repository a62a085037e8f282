"""CLM's approval of a signing request: an Ed25519 signature the CA checks before it does anything else.

CLM signs, with a private key only CLM holds (a PEM file readable by the service user only), the canonical bytes
of every field of a SignCertificate except the two approval fields; the CSR enters by its SHA-256. CARA holds the
public keys it trusts (a list, so keys can be rotated: add the new public key to every CARA member, switch CLM to
the new private key, then drop the old public key) and refuses a request whose approval is missing, names a key
it does not trust or does not verify: publish rights on the bus are not enough to get a certificate signed.

Why a signature and not a MAC: CARA then holds nothing that can approve; a copy of CARA's config approves nothing.
Why every field rather than a list: whatever the CA uses to build the certificate is covered, including fields
added to SignCertificate later (they are in the model dump without a change here).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hapki.contracts.errors import ApprovalInvalid
from hapki.contracts.models import SignCertificate
from hapki.runtime.config import require_owner_only

# Domain separation: these bytes can never be mistaken for another hapki signature's input (or a later version's).
DOMAIN = b"hapki.approval.v1\n"
APPROVAL_FIELDS = frozenset({"approval", "approval_key_id"})


def approval_payload(request: SignCertificate) -> bytes:
    """The bytes an approval signs: DOMAIN + canonical JSON of every non-approval field, the CSR as its SHA-256.

    Canonical JSON: sorted keys, no spaces, ASCII only; lists keep their order (it is the certificate's order).
    """
    fields = request.model_dump(mode="json", exclude=APPROVAL_FIELDS)
    assert "csr_sha256" not in fields, "a SignCertificate field named csr_sha256 would be ambiguous here"
    fields["csr_sha256"] = hashlib.sha256(fields.pop("csr_pem").encode("utf-8")).hexdigest()
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The id an approval names its key by: the first 8 bytes of SHA-256 of the raw public key, in hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class ApprovalKey:
    """CLM's private approval key: signs the SignCertificate messages CLM sends the CA."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def generate(cls) -> ApprovalKey:
        """A fresh key in memory (tests; `generate_key_files` for real keys)."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: Path) -> ApprovalKey:
        """Load a PEM (PKCS#8) Ed25519 private key; ValueError if the file is readable by others or is no such key."""
        try:
            require_owner_only(path, "CLM approval key file")
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the CLM approval key file {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            raise ValueError(f"CLM approval key file {path} holds no unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"CLM approval key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, request: SignCertificate) -> SignCertificate:
        """The same request with this key's approval over it."""
        signature = self._key.sign(approval_payload(request))
        return request.model_copy(update={"approval": base64.b64encode(signature).decode("ascii"),
                                          "approval_key_id": self.key_id})


class ApprovalVerifier:
    """The CA side: the CLM approval public keys it trusts, by key id."""

    def __init__(self, public_keys: Iterable[ed25519.Ed25519PublicKey]) -> None:
        self._keys = {key_id(key): key for key in public_keys}
        if not self._keys:
            raise ValueError("at least one trusted CLM approval public key is needed")

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> ApprovalVerifier:
        """Load PEM (SubjectPublicKeyInfo) Ed25519 public keys; ValueError naming the file that is not one."""
        keys = []
        for path in paths:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except OSError as exc:
                raise ValueError(f"cannot read the CLM approval public key {path}: {exc.strerror}") from None
            except (ValueError, UnsupportedAlgorithm):
                raise ValueError(f"{path} holds no PEM public key") from None
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
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
            key.verify(signature, approval_payload(request))
        except (binascii.Error, InvalidSignature):
            raise refuse("the approval does not verify over this content") from None


def generate_key_files(private_path: Path, public_path: Path) -> str:
    """Create a new approval key pair: the private key (PEM, mode 0600, never overwritten) and its public key.

    Returns the key id. Raises FileExistsError if the private key file exists already.
    """
    key = ed25519.Ed25519PrivateKey.generate()
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
