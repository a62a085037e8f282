"""CA key ceremony: a P-384 root and a P-256 issuing CA, both keys generated inside the HSM.

Time is passed in; nothing here reads the clock. Both certificates are signed through the HSM (the private keys
never exist outside it) and are checked against each other before being returned. With two or more HSM members
each key is generated once and replicated to the others (hapki.runtime.hsm_replication), so any member can sign.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hapki.cara import issuance
from hapki.cara.crl import build_crl
from hapki.cara.ports import CrlEntry
from hapki.runtime.hsm import HSMMemberConfig, HSMPool, HSMPrivateKey
from hapki.runtime.hsm_replication import generate_replicated_ec_key

ROOT_CURVE = ec.SECP384R1()
ISSUING_CURVE = ec.SECP256R1()
ROOT_VALIDITY_YEARS = 20
ISSUING_VALIDITY_YEARS = 10
OCSP_CURVE = ec.SECP256R1()
# The responder certificate carries id-pkix-ocsp-nocheck, so relying parties cannot check its revocation: keep it
# short (rotation re-runs the ceremony; hapki ca init does it when the signer is missing).
OCSP_SIGNER_VALIDITY = timedelta(days=90)
ARL_VALIDITY = timedelta(days=365)  # the root's CRL: BR 4.9.7 asks for one at least every 12 months


@dataclass(frozen=True)
class CAHierarchy:
    """What the ceremony produced: the two certificates and where their keys live in the HSM."""

    root_cert: x509.Certificate
    issuing_cert: x509.Certificate
    root_key_id: bytes  # CKA_ID of the root key (16 random bytes)
    issuing_key_id: bytes  # CKA_ID of the issuing CA key (16 random bytes)
    issuing_curve: str  # cryptography curve name of the issuing key, e.g. "secp256r1"


def create_hierarchy(
    pool: HSMPool,
    *,
    root_name: str = "hapki Root CA",
    issuing_name: str = "hapki Issuing CA 1",
    org: str = "hapki",
    now: datetime,
    replicate_across: Sequence[HSMMemberConfig] = (),
    root_crl_url: str | None = None,
) -> CAHierarchy:
    """Generate both CA keys in the HSM and return the self-signed root and the root-signed issuing CA.

    `replicate_across`: the HSM members that must all hold the CA keys, source first (normally the pool's own
    members, in order). With two or more, each key is generated in the first and copied to the others under the
    cluster KEK, which `hsm_replication.provision_kek` must have put in place (before the pool logged in); every
    member must be up. Empty (or one member): the pool generates each key in its first usable member.
    """
    if now.tzinfo is None or now.utcoffset() != timedelta(0):
        raise ValueError("now must be an aware UTC datetime")
    now = now.replace(microsecond=0)  # X.509 times have second precision; keep the returned values exact

    # Step 1: the root key, then its self-signed certificate.
    root_key = _generate_key(pool, replicate_across, "root", ROOT_CURVE)
    root_subject = _name(org, root_name)
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root_cert = (
        x509.CertificateBuilder()
        .subject_name(root_subject)
        .issuer_name(root_subject)
        .public_key(root_key.public_key())
        .serial_number(issuance.random_serial())
        .not_valid_before(now)
        .not_valid_after(_add_years(now, ROOT_VALIDITY_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA384())
    )

    # Step 2: the issuing key, certified by the root key (in the HSM). pathlen 0: it issues end entities only.
    issuing_key = _generate_key(pool, replicate_across, "issuing", ISSUING_CURVE)
    issuing_cert = issuing_certificate(issuing_key.public_key(), _name(org, issuing_name), root_cert=root_cert,
                                       root_key=root_key, now=now, root_crl_url=root_crl_url)

    # Step 3: check the HSM's work before anyone relies on it.
    root_cert.verify_directly_issued_by(root_cert)
    issuing_cert.verify_directly_issued_by(root_cert)
    return CAHierarchy(
        root_cert=root_cert,
        issuing_cert=issuing_cert,
        root_key_id=root_key.key_id,
        issuing_key_id=issuing_key.key_id,
        issuing_curve=ISSUING_CURVE.name,
    )


def issuing_certificate(public_key: ec.EllipticCurvePublicKey, subject: x509.Name, *, root_cert: x509.Certificate,
                        root_key: ec.EllipticCurvePrivateKey, now: datetime,
                        root_crl_url: str | None = None) -> x509.Certificate:
    """An issuing CA certificate (pathlen 0: it issues end entities only) for `public_key`, signed by the root key,
    valid ISSUING_VALIDITY_YEARS from `now` and never past the root; with `root_crl_url`, a CRL distribution point
    naming the root's CRL (the ARL: where relying parties learn that the root revoked it)."""
    root_ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = x509.CertificateBuilder()
    if root_crl_url is not None:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(root_crl_url)], relative_name=None, reasons=None,
            crl_issuer=None)]), critical=False)
    return (
        builder
        .subject_name(subject)
        .issuer_name(root_cert.subject)
        .public_key(public_key)
        .serial_number(issuance.random_serial())
        .not_valid_before(now)
        .not_valid_after(min(_add_years(now, ISSUING_VALIDITY_YEARS), root_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root_key, hashes.SHA384())
    )


@dataclass(frozen=True)
class IssuingCA:
    """A new issuing CA under an existing root (`hapki ca rollover`): its certificate and its key's CKA_ID."""

    cert: x509.Certificate
    key_id: bytes


def create_issuing_ca(
    pool: HSMPool,
    *,
    root_cert: x509.Certificate,
    common_name: str,
    org: str = "hapki",
    now: datetime,
    replicate_across: Sequence[HSMMemberConfig] = (),
    root_crl_url: str | None = None,
) -> IssuingCA:
    """Generate a new issuing CA key in the HSM and certify it with the root key, which must be in the HSM (found
    by its public key). How a CA rolls over to a new issuing CA before the current one runs out or after its key
    is retired; the root and everything it certified stay as they are."""
    if now.tzinfo is None or now.utcoffset() != timedelta(0):
        raise ValueError("now must be an aware UTC datetime")
    now = now.replace(microsecond=0)
    if root_cert.not_valid_after_utc <= now:
        raise ValueError(f"the root CA certificate ended {root_cert.not_valid_after_utc:%Y-%m-%d}: a new root "
                         "takes `hapki ca init` on a new site")
    root_key = find_root_key(pool, root_cert)
    issuing_key = _generate_key(pool, replicate_across, "issuing", ISSUING_CURVE)
    cert = issuing_certificate(issuing_key.public_key(), _name(org, common_name), root_cert=root_cert,
                               root_key=root_key, now=now, root_crl_url=root_crl_url)
    cert.verify_directly_issued_by(root_cert)  # check the HSM's work before anyone relies on it
    return IssuingCA(cert=cert, key_id=issuing_key.key_id)


def find_root_key(pool: HSMPool, root_cert: x509.Certificate) -> HSMPrivateKey:
    """The root's key in the HSM, found by the root certificate's public key (no key id is stored for it);
    ValueError if it is not there."""
    root_public = root_cert.public_key()
    if not isinstance(root_public, ec.EllipticCurvePublicKey):
        raise ValueError(f"the root CA has a {type(root_public).__name__}, not an EC key")
    root_key_id = pool.find_key_id(root_public)
    if root_key_id is None:
        raise ValueError(f"the root CA's key ({root_cert.subject.rfc4514_string()}) is not in the HSM")
    return pool.private_key(root_key_id)


def sign_arl(entries: Sequence[CrlEntry], *, root_cert: x509.Certificate, root_key: ec.EllipticCurvePrivateKey,
             number: int, now: datetime) -> tuple[bytes, datetime, datetime]:
    """The root's CRL (ARL) over the issuing CAs it revoked: valid ARL_VALIDITY (BR 4.9.7: re-signed at least every
    12 months; `hapki ca arl`); DER, thisUpdate, nextUpdate."""
    this_update = now.replace(microsecond=0)
    next_update = this_update + ARL_VALIDITY
    crl = build_crl(list(entries), issuer_cert=root_cert, issuer_key=root_key, number=number, base=None,
                    this_update=this_update, next_update=next_update)
    return crl.public_bytes(serialization.Encoding.DER), this_update, next_update


@dataclass(frozen=True)
class DelegatedSigner:
    """A key the issuing CA certifies for one purpose (OCSP responses, audit checkpoints): its certificate and the
    CKA_ID of its HSM key."""

    cert: x509.Certificate
    key_id: bytes


@dataclass(frozen=True)
class _Purpose:
    """What a delegated signer is certified for."""

    label: str  # appended to the issuing CA's common name
    validity: timedelta | None  # None: as long as the issuing CA
    non_repudiation: bool
    extensions: tuple[tuple[x509.ExtensionType, bool], ...]


PURPOSES = {
    # RFC 6960 4.2.2.2: EKU id-kp-OCSPSigning; id-pkix-ocsp-nocheck; digitalSignature only.
    "ocsp": _Purpose("OCSP Responder", OCSP_SIGNER_VALIDITY, False, (
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False), (x509.OCSPNoCheck(), False))),
    # Audit checkpoints: verifiable for as long as the log is kept, so as long as the issuing CA. No EKU is defined
    # for this; digitalSignature + nonRepudiation (contentCommitment): the key signs statements.
    "audit": _Purpose("Audit Signer", None, True, ()),
}


def create_delegated_signer(
    pool: HSMPool,
    purpose: str,
    *,
    issuing_cert: x509.Certificate,
    issuing_key_id: bytes,
    org: str = "hapki",
    now: datetime,
    replicate_across: Sequence[HSMMemberConfig] = (),
    serial: int | None = None,
) -> DelegatedSigner:
    """Generate a P-256 key in the HSM and certify it with the issuing CA key for one of PURPOSES, under `serial`
    (reserved by the caller first: hapki.runtime.delegated_intents; None: a random one)."""
    if now.tzinfo is None or now.utcoffset() != timedelta(0):
        raise ValueError("now must be an aware UTC datetime")
    now = now.replace(microsecond=0)
    key = _generate_key(pool, replicate_across, purpose, OCSP_CURVE)
    common_name = issuing_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    spec = PURPOSES[purpose]
    cert = delegated_certificate(
        purpose, _name(org, f"{common_name} {spec.label}"), key.public_key(), issuing_cert=issuing_cert,
        issuing_key=pool.private_key(issuing_key_id), serial=issuance.random_serial() if serial is None else serial,
        now=now)
    return DelegatedSigner(cert=cert, key_id=key.key_id)


def recertify(current: x509.Certificate, purpose: str, *, issuing_cert: x509.Certificate,
              issuing_key: ec.EllipticCurvePrivateKey, serial: int, now: datetime) -> x509.Certificate:
    """A new certificate for a delegated signer's existing key (same subject, key and extensions, a new serial and
    validity from `now`): how the active CARA member renews the OCSP responder before it expires. It signs with
    the issuing CA key, as for any certificate; no key is created, so its read-only HSM sessions suffice."""
    if now.tzinfo is None or now.utcoffset() != timedelta(0):
        raise ValueError("now must be an aware UTC datetime")
    try:  # only what this CA certified is renewed
        current.verify_directly_issued_by(issuing_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise ValueError(f"certificate {current.serial_number:x} was not issued by "
                         f"{issuing_cert.subject.rfc4514_string()}") from exc
    public_key = current.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError(f"a delegated signer has an EC key, not {type(public_key).__name__}")
    return delegated_certificate(purpose, current.subject, public_key, issuing_cert=issuing_cert,
                                 issuing_key=issuing_key, serial=serial, now=now.replace(microsecond=0))


def delegated_certificate(purpose: str, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *,
                          issuing_cert: x509.Certificate, issuing_key: ec.EllipticCurvePrivateKey, serial: int,
                          now: datetime) -> x509.Certificate:
    """The certificate of a delegated signer for one of PURPOSES, signed by the issuing CA (its validity capped by
    the issuing CA's), checked against it."""
    spec = PURPOSES[purpose]
    issuing_ski = issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = issuing_cert.not_valid_after_utc
    if spec.validity is not None:
        not_after = min(now + spec.validity, not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuing_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=spec.non_repudiation, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
            decipher_only=False,
        ), critical=True)
    )
    for extension, critical in spec.extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert = (
        builder
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuing_ski), critical=False)
        .sign(issuing_key, hashes.SHA256())
    )
    cert.verify_directly_issued_by(issuing_cert)
    return cert


def _generate_key(pool: HSMPool, members: Sequence[HSMMemberConfig], role: str,
                  curve: ec.EllipticCurve) -> HSMPrivateKey:
    key_id = secrets.token_bytes(16)
    label = f"hapki-{role}-{key_id.hex()}"
    if len(members) > 1:
        public_key = generate_replicated_ec_key(members, label, key_id, curve)
    else:
        public_key = pool.generate_ec_key(label, key_id, curve)
    return HSMPrivateKey(pool, key_id, public_key)


def _name(org: str, common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )


def _add_years(moment: datetime, years: int) -> datetime:
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:  # 29 February in a non-leap target year
        return moment.replace(year=moment.year + years, day=28)
