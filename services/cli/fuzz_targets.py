"""Fuzz targets of hapki's three parsers of untrusted bytes, and the seeds they start from.

Each target takes any bytes and returns normally, or raises one of the project's typed errors (which the target
swallows): any other exception, a hang or unbounded memory is a finding. Used by `hapki fuzz` (atheris or the
built-in mutator) and by the hypothesis property tests in tests/unit/fuzz/.

- csr: what CLM does with a CSR: `validation.approve` (PEM, base64 DER or raw text; both shipped profiles) and
  `validation.is_well_formed`.
- contracts: `model_validate_json` of every wire model, on the raw bytes, after the edge's size check.
- ocsp: what CARA's OCSP responder does with a request body, without its database: `ocsp.parse_request`, then
  for a request about the (fuzz) issuer, the signed response for each kind of status, read back.
"""

from __future__ import annotations

import base64
import functools
import json
import textwrap
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ValidationError

from hapki.cara.ocsp import OcspResponder, parse_request
from hapki.cara.ports import IssuerRecord, SerialStatus
from hapki.runtime import validation
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.contracts import models
from hapki.contracts.errors import HapkiError, MalformedMessage
from hapki.contracts.limits import MAX_CSR_CHARS, MAX_REQUEST_BYTES

REQUEST_ID = "0" * 32
PROFILES = load_profiles(SHIPPED_PROFILES_PATH)
_PROFILE_NAMES = sorted(PROFILES)
# Every message model of the wire contract, in a fixed order (the first input byte picks one).
CONTRACT_MODELS: tuple[type[BaseModel], ...] = tuple(
    value for _, value in sorted(vars(models).items())
    if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == models.__name__
    and not value.__name__.startswith("_")
)


def csr_input(data: bytes) -> None:
    """The CSR path of CLM: byte 0 picks the encoding (PEM armour, bare base64, raw text) and the profile."""
    if not data:
        return
    mode, body = data[0], data[1:]
    encoding = mode % 3
    if encoding == 0:
        text = _pem(body)
    elif encoding == 1:
        text = base64.b64encode(body).decode("ascii")
    else:
        text = body.decode("latin-1")
    try:
        request = models.IssueCertificate(csr_pem=text[:MAX_CSR_CHARS], profile=_PROFILE_NAMES[mode // 3 % 2],
                                          requester="fuzz")
        validation.approve(request, PROFILES, REQUEST_ID)
    except (HapkiError, ValidationError):
        pass
    validation.is_well_formed(text[:MAX_CSR_CHARS])


def contracts_input(data: bytes) -> None:
    """The contract decoders: byte 0 picks the model, the rest is the message, refused over the size cap first."""
    if not data:
        return
    model = CONTRACT_MODELS[data[0] % len(CONTRACT_MODELS)]
    body = data[1:]
    if len(body) > MAX_REQUEST_BYTES:
        return
    try:
        parsed = model.model_validate_json(body)
    except ValidationError:
        return
    # What parsed must serialise and parse back to itself (a reply is built from it, an event republished).
    assert model.model_validate_json(parsed.model_dump_json()) == parsed


def ocsp_input(data: bytes) -> None:
    """CARA's OCSP responder without its database: parse, then (about our issuer) sign a response and re-read it."""
    try:
        question = parse_request(data)
    except MalformedMessage:
        return
    responder = _responder()
    if responder.authoritative(question):
        status = _OCSP_STATUSES[len(data) % len(_OCSP_STATUSES)]
        x509_ocsp.load_der_ocsp_response(responder.sign_response(question, status))


_OCSP_STATUSES = (
    SerialStatus(known=False), SerialStatus(known=True),
    SerialStatus(known=True, revoked_at=datetime(2026, 1, 1, tzinfo=timezone.utc), reason="key_compromise"),
    SerialStatus(known=True, revoked_at=datetime(2026, 1, 1, tzinfo=timezone.utc), reason="unspecified"),
)


@functools.cache
def _fuzz_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A throwaway EC CA (software key) that the OCSP seeds ask about and the fuzz responder answers for."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz CA")])
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(12345).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return key, cert


@functools.cache
def _responder() -> OcspResponder:
    key, cert = _fuzz_ca()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return OcspResponder(store=None, issuer=IssuerRecord(name="fuzz", cert_pem=pem, chain_pem=pem, key_id=b"k"),  # type: ignore[arg-type]
                         signer_cert=cert, signer_key=key, validity_seconds=3600,
                         clock=lambda: datetime(2026, 1, 1, 12, tzinfo=timezone.utc))


TARGETS: dict[str, Callable[[bytes], None]] = {"csr": csr_input, "contracts": contracts_input, "ocsp": ocsp_input}


def _pem(der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode("ascii"), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


# --- seeds ---------------------------------------------------------------------------------------------------


@functools.cache
def seeds(target: str) -> list[bytes]:
    """Valid inputs for `target`, so mutations start deep inside the parsers."""
    return {"csr": _csr_seeds, "contracts": _contract_seeds, "ocsp": _ocsp_seeds}[target]()


def _csr(key: object, cn: str | None, sans: list[x509.GeneralName]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def _csr_seeds() -> list[bytes]:
    import ipaddress

    p256 = ec.generate_private_key(ec.SECP256R1())
    keys = [p256, ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(public_exponent=65537,
            key_size=2048), ed25519.Ed25519PrivateKey.generate()]
    names: list[x509.GeneralName] = [x509.DNSName("a.example.com"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                                     x509.RFC822Name("ops@example.com")]
    ders = [_csr(key, "a.example.com", names) for key in keys]
    ders.append(_csr(p256, None, [x509.DNSName(f"h{i}.example.com") for i in range(40)]))
    ders.append(_csr(p256, "xn--bcher-kva.example", [x509.DNSName("*.example.org")]))
    out = []
    for index, der in enumerate(ders):
        out += [bytes([0 + 3 * (index % 2)]) + der, bytes([1]) + der, bytes([2]) + _pem(der).encode("ascii")]
    return out


def _contract_seeds() -> list[bytes]:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc).isoformat()
    samples: dict[str, dict[str, object]] = {
        "IssueCertificate": {"csr_pem": "MIIB", "profile": "tls-server", "requester": "alice",
                             "idempotency_key": "k-1"},
        "RenewCertificate": {"serial": "0a1b", "csr_pem": "MIIB", "requester": "alice", "profile": "tls-client"},
        "RevokeCertificate": {"serial": "0a1b", "reason": "key_compromise", "requester": "alice"},
        "SearchCertificates": {"subject": "a.example.com", "status": "valid", "expiring_before": now,
                               "cursor": "abc", "limit": 10},
        "StatusQuery": {"request_id": REQUEST_ID},
        "CertificateQuery": {"serial": "0a1b"},
        "SignCertificate": {"request_id": REQUEST_ID, "profile": "tls-server", "csr_pem": "MIIB",
                            "common_name": "a.example.com", "dns_names": ["a.example.com"],
                            "ip_addresses": ["10.0.0.1"], "emails": [], "validity_seconds": 86400,
                            "key_usage": ["digital_signature"], "extended_key_usage": ["server_auth"]},
        "CertificateIssued": {"request_id": REQUEST_ID, "serial": "0a1b", "issuer": "hapki", "certificate_pem": "x",
                              "chain_pem": "y", "not_before": now, "not_after": now},
        "SigningFailed": {"request_id": REQUEST_ID, "error": {"code": "SIGNING_REJECTED", "message": "no",
                                                              "details": {"a": [1, {"b": None}]}}},
        "IssueReply": {"request_id": REQUEST_ID, "status": "issued", "serial": "0a1b", "not_after": now},
        "HAEvent": {"tier": "cara", "member": "cara-1", "vip": "10.0.0.1", "role": "active", "holds_vip": True,
                    "epoch": 3, "observed_at": now, "reason": "vip gained", "health": {"hsm": {"a": True}}},
    }
    names = [model.__name__ for model in CONTRACT_MODELS]
    return [bytes([names.index(name)]) + json.dumps(body).encode() for name, body in samples.items()
            if name in names]


def _ocsp_seeds() -> list[bytes]:
    _, cert = _fuzz_ca()
    out = []
    for algorithm in (hashes.SHA1(), hashes.SHA256(), hashes.SHA512()):
        builder = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, cert, algorithm)
        out.append(builder.build().public_bytes(serialization.Encoding.DER))
        for nonce in (b"\x01" * 16, b"\x02" * 32):
            out.append(builder.add_extension(x509.OCSPNonce(nonce), critical=False).build()
                       .public_bytes(serialization.Encoding.DER))
    return out
