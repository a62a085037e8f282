"""Make PKCS#10 requests for tests: `make_csr(["a.example.com"], key=make_key("p256"), cn=...)`.

Keys are cached per kind (RSA generation is slow), so reuse is cheap; pass `fresh=True` to `make_key` for a
key no other test has seen.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import textwrap
import warnings
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

_CURVES = {
    "p256": ec.SECP256R1,
    "p384": ec.SECP384R1,
    "p521": ec.SECP521R1,
    "secp256k1": ec.SECP256K1,
    "brainpoolp256r1": ec.BrainpoolP256R1,
}


def _generate(kind: str) -> PrivateKey:
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind]())
    if kind.startswith("rsa"):
        # "rsa2048", or "rsa2048e3" for a public exponent of 3
        bits, _, exponent = kind[3:].partition("e")
        return rsa.generate_private_key(public_exponent=int(exponent or 65537), key_size=int(bits))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if kind.startswith("dsa"):
        return dsa.generate_private_key(key_size=int(kind[3:] or 2048))
    raise ValueError(f"unknown key kind {kind!r}")


@functools.cache
def _cached(kind: str) -> PrivateKey:
    return _generate(kind)


def make_key(kind: str = "p256", *, fresh: bool = False) -> PrivateKey:
    """A private key of this kind: p256, p384, p521, secp256k1, rsa2048, rsa1024, rsa2048e3, ed25519, dsa2048."""
    return _generate(kind) if fresh else _cached(kind)


def general_name(name: str | x509.GeneralName) -> x509.GeneralName:
    """A SAN entry from text: an IP literal -> IPAddress, something with '@' -> RFC822Name, else DNSName."""
    if isinstance(name, x509.GeneralName):
        return name
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if "@" in name:
        return x509.RFC822Name(name)
    return x509.DNSName(name)


def raw_email(value: str) -> x509.RFC822Name:
    """An email SAN without cryptography's own syntax check, to test ours."""
    return x509.RFC822Name._init_without_validation(value)


def raw_cn(value: str) -> x509.NameAttribute:
    """A CN attribute without cryptography's length check (it refuses CNs over 64 characters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the length warning that replaces the check
        return x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)


def make_csr_obj(
    names: Iterable[str | x509.GeneralName] = (),
    *,
    key: PrivateKey | None = None,
    cn: str | None = None,
    subject: Sequence[x509.NameAttribute] = (),
    san: bool | None = None,
) -> x509.CertificateSigningRequest:
    """Build and sign a CSR object. `san=None` adds a SAN extension only when `names` is not empty."""
    key = key if key is not None else make_key("p256")
    attributes = list(subject)
    if cn is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    entries = [general_name(name) for name in names]
    if san or (san is None and entries):
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    algorithm = None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()
    return builder.sign(key, algorithm)


def make_csr(
    names: Iterable[str | x509.GeneralName] = (),
    *,
    key: PrivateKey | None = None,
    cn: str | None = None,
    subject: Sequence[x509.NameAttribute] = (),
    san: bool | None = None,
) -> tuple[str, PrivateKey]:
    """Build and sign a CSR for these names; return (PEM text, private key). Default key: a cached P-256 key."""
    key = key if key is not None else make_key("p256")
    csr = make_csr_obj(names, key=key, cn=cn, subject=subject, san=san)
    return csr.public_bytes(Encoding.PEM).decode("ascii"), key


def csr_der(pem: str) -> bytes:
    """The DER bytes of a PEM CSR."""
    return x509.load_pem_x509_csr(pem.encode("ascii")).public_bytes(Encoding.DER)


def der_to_pem(der: bytes) -> str:
    """Armour DER bytes as a PEM CERTIFICATE REQUEST, whether or not they parse."""
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode("ascii"), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"
