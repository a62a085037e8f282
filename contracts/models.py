"""Pydantic models of every message on the hapki bus. Strict: unknown fields are refused.

Sizes are in characters of the JSON string values; times are UTC, timezone-aware.
"""

from __future__ import annotations

import enum
import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from hapki.contracts.errors import ErrorCode

from hapki.contracts.limits import MAX_CSR_CHARS, MAX_REQUEST_BYTES  # noqa: F401  (re-exported: the caps' old home)

RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="Request id: 32 lowercase hex digits")]
SerialHex = Annotated[
    str,
    Field(pattern=r"^[0-9a-f]{2,40}$", description="Certificate serial number, lowercase hex, at most 20 octets"),
]

IdempotencyKey = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
# Who asks: it is logged, stored, audited and compared, so only printable ASCII, no leading or trailing space:
# no control characters (newlines, NUL, ESC), no bidi overrides or other invisible Unicode that could forge
# a log line or make two requesters look alike.
Requester = Annotated[str, Field(
    min_length=1, max_length=128, pattern=r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$",
    description="Who asks (an account or service name): printable ASCII, at most 128 characters",
)]
# A profile name as profiles.toml defines them: letters, digits, dot, underscore, hyphen.
ProfileName = Annotated[str, Field(
    min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$", description="Certificate profile name, e.g. tls-server",
)]


def _finite(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse NaN and infinities anywhere in a free-form JSON object: JSON has no such numbers.

    pydantic reads `NaN` or `1e400` into them and writes them back as null, so a message would not survive a
    relay (what the contracts fuzz target's round-trip check asserts)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("NaN and infinite numbers are not JSON")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_finite)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestStatus(str, enum.Enum):
    """Where a certificate request is in its life."""

    PENDING = "pending"  # accepted and recorded, waiting for the CA
    ISSUED = "issued"  # certificate signed and stored
    FAILED = "failed"  # the CA refused it; `error` says why


class ErrorBody(_Model):
    """A structured error: a code from ErrorCode, a human message, and machine-readable details."""

    code: ErrorCode = Field(description="Error code, from the enumerated list")
    message: str = Field(description="What was wrong, for a human")
    details: JsonObject = Field(default_factory=dict, description="Machine-readable specifics (field, value, limit)")


class IssueCertificate(_Model):
    """Command to CLM (`pki.v1.clm.issue`): issue a certificate for this CSR under this profile."""

    csr_pem: str = Field(max_length=MAX_CSR_CHARS, description="PKCS#10 request, PEM (or base64 DER)")
    profile: ProfileName
    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        description="Client-chosen key; a repeat with the same key and requester returns the original result",
    )
    requester: Requester


class IssueReply(_Model):
    """Reply to `pki.v1.clm.issue` and `pki.v1.clm.status`: the request's state, or an error."""

    request_id: str | None = Field(default=None, description="Request id (absent when the request was refused)")
    status: RequestStatus | None = Field(default=None, description="pending, issued or failed")
    certificate_pem: str | None = Field(default=None, description="The issued certificate, PEM")
    chain_pem: str | None = Field(default=None, description="Issuing CA then root, PEM, not including the leaf")
    serial: SerialHex | None = None
    not_before: datetime | None = Field(default=None, description="Validity start, UTC")
    not_after: datetime | None = Field(default=None, description="Validity end, UTC")
    error: ErrorBody | None = Field(default=None, description="Set when the request was refused or failed")


class StatusQuery(_Model):
    """Query to CLM (`pki.v1.clm.status`): the state of one request."""

    request_id: RequestId


class CertificateQuery(_Model):
    """Query to CLM (`pki.v1.clm.certificate`): one certificate by serial."""

    serial: SerialHex


class CertificateReply(_Model):
    """Reply to `pki.v1.clm.certificate`."""

    serial: SerialHex | None = None
    request_id: str | None = None
    issuer: str | None = Field(default=None, description="Name of the issuing CA")
    certificate_pem: str | None = None
    chain_pem: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    error: ErrorBody | None = None


class RevocationReason(str, enum.Enum):
    """RFC 5280 5.3.1 CRLReason, by cryptography's `x509.ReasonFlags` names.

    Accepted for end-entity certificates (CA/Browser Forum BR 7.2.2): unspecified, key_compromise,
    affiliation_changed, superseded, cessation_of_operation, privilege_withdrawn. Refused with FORBIDDEN_REASON:
    certificate_hold and remove_from_crl (this CA has no holds: a revocation is final), ca_compromise and
    aa_compromise (they describe a CA or attribute authority, not a subscriber's certificate).
    """

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key_compromise"
    CA_COMPROMISE = "ca_compromise"
    AFFILIATION_CHANGED = "affiliation_changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation_of_operation"
    CERTIFICATE_HOLD = "certificate_hold"
    REMOVE_FROM_CRL = "remove_from_crl"
    PRIVILEGE_WITHDRAWN = "privilege_withdrawn"
    AA_COMPROMISE = "aa_compromise"


FORBIDDEN_REASONS = frozenset({
    RevocationReason.CERTIFICATE_HOLD, RevocationReason.REMOVE_FROM_CRL,
    RevocationReason.CA_COMPROMISE, RevocationReason.AA_COMPROMISE,
})


class RevokeCertificate(_Model):
    """Command to CLM (`pki.v1.clm.revoke`): revoke one certificate. Idempotent by (serial, reason)."""

    serial: SerialHex
    reason: RevocationReason = Field(description="RFC 5280 reason; certificate_hold, remove_from_crl, "
                                                 "ca_compromise and aa_compromise are refused (FORBIDDEN_REASON)")
    requester: Requester


class RevokeReply(_Model):
    """Reply to `pki.v1.clm.revoke`: the revocation as stored (the first one, for a repeat), or an error."""

    serial: SerialHex | None = None
    issuer: str | None = Field(default=None, description="Name of the issuing CA")
    reason: RevocationReason | None = None
    revoked_at: datetime | None = Field(default=None, description="When CLM recorded the revocation, UTC")
    requester: str | None = Field(default=None, description="Who revoked it (the first requester, for a repeat)")
    error: ErrorBody | None = None


class CertificateRevoked(_Model):
    """Event from CLM (`pki.v1.clm.revoked`, core NATS): a revocation is recorded; CARA regenerates its CRLs."""

    issuer: str
    serial: SerialHex
    reason: RevocationReason
    revoked_at: datetime


class CertificateState(str, enum.Enum):
    """What an issued certificate is now (search filter and result). Revoked wins over expired."""

    VALID = "valid"  # issued, not revoked, not_after in the future
    REVOKED = "revoked"  # revoked (whether or not it has expired since)
    EXPIRED = "expired"  # not revoked, not_after in the past


# Page size of a search: the default and the most one page may hold.
DEFAULT_SEARCH_LIMIT = 100
MAX_SEARCH_LIMIT = 500
# A name as CLM stores it after validation: printable ASCII (A-labels, IPs, emails), at most 255 characters.
SearchName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")]


class SearchCertificates(_Model):
    """Query to CLM (`pki.v1.clm.search`): issued certificates matching every given filter, one page at a time.

    Results are ordered by (not_after, request id); pass the previous reply's `next_cursor` for the next page.
    Pending and failed requests are not certificates and are not listed (ask `pki.v1.clm.status` by request id).
    """

    serial: SerialHex | None = Field(default=None, description="Exactly this serial (lowercase hex)")
    subject: SearchName | None = Field(default=None, description="Subject common name, exact, case-insensitive")
    san: SearchName | None = Field(
        default=None, description="A subjectAltName (DNS name, IP address or email), exact, case-insensitive"
    )
    requester: Requester | None = Field(default=None, description="Who requested it")
    profile: ProfileName | None = Field(default=None, description="Certificate profile name")
    status: CertificateState | None = Field(default=None, description="valid, revoked or expired, as of now")
    expiring_before: AwareDatetime | None = Field(
        default=None, description="Only certificates whose not_after is before this time (timezone required)"
    )
    cursor: str | None = Field(
        default=None, min_length=1, max_length=256, description="Opaque position from a previous reply's next_cursor"
    )
    limit: int = Field(
        default=DEFAULT_SEARCH_LIMIT, ge=1, le=MAX_SEARCH_LIMIT, description="Most items in one reply"
    )


class CertificateSummary(_Model):
    """One certificate in the inventory (a search result)."""

    serial: SerialHex
    issuer: str = Field(description="Name of the issuing CA")
    request_id: RequestId
    requester: str = Field(description="Who requested it")
    profile: str = Field(description="Profile it was issued under")
    status: CertificateState = Field(description="valid, revoked or expired at the time of the search")
    common_name: str | None = Field(default=None, description="Subject CN, if any")
    dns_names: list[str] = Field(default_factory=list, description="DNS subjectAltNames")
    ip_addresses: list[str] = Field(default_factory=list, description="IP address subjectAltNames")
    emails: list[str] = Field(default_factory=list, description="Email (rfc822Name) subjectAltNames")
    not_before: datetime | None = Field(default=None, description="Validity start, UTC")
    not_after: datetime = Field(description="Validity end, UTC")
    revoked_at: datetime | None = Field(default=None, description="When it was revoked, UTC")
    revocation_reason: RevocationReason | None = Field(default=None, description="Why it was revoked")
    renews_serial: SerialHex | None = Field(default=None, description="The certificate this one renewed, if any")


class SearchReply(_Model):
    """Reply to `pki.v1.clm.search`: one page of certificates, or an error."""

    items: list[CertificateSummary] = Field(default_factory=list, description="This page, in (not_after, id) order")
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; absent on the last page"
    )
    error: ErrorBody | None = Field(default=None, description="Set when the query was refused")


class RenewCertificate(_Model):
    """Command to CLM (`pki.v1.clm.renew`): a new certificate for exactly the names of an issued one, new CSR.

    The requester must be the predecessor's; the predecessor must not be revoked (an expired one may be renewed).
    Replies with IssueReply, like `pki.v1.clm.issue`, and is idempotent the same way.
    """

    serial: SerialHex = Field(description="Serial of the certificate to renew (the predecessor)")
    csr_pem: str = Field(max_length=MAX_CSR_CHARS, description="PKCS#10 request with the same names, PEM (or base64 DER)")
    requester: Requester = Field(description="Who asks: must be the predecessor's requester")
    profile: ProfileName | None = Field(
        default=None, description="Profile of the new certificate; default: the predecessor's"
    )
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="Client-chosen key; a repeat with the same key and requester returns the first result"
    )


class CertificateExpiring(_Model):
    """Event from CLM (`pki.v1.clm.expiring`, stream PKI_EXPIRY): a certificate entered an expiry window.

    Once per certificate per window. Not sent for revoked certificates, nor for one already renewed.
    """

    issuer: str = Field(description="Name of the issuing CA")
    serial: SerialHex
    request_id: RequestId
    requester: str = Field(description="Who requested the certificate")
    profile: str = Field(description="Profile it was issued under")
    common_name: str | None = Field(default=None, description="Subject CN, if any")
    not_after: datetime = Field(description="Validity end, UTC")
    window_seconds: int = Field(gt=0, description="The window it entered: not_after is at most this far ahead, seconds")
    detected_at: datetime = Field(description="When the scheduler found it in the window, UTC")


class SignCertificate(_Model):
    """Command from CLM to CARA on the signing work queue (`pki.v1.cara.sign`), Nats-Msg-Id = request_id.

    Carries what CLM approved: the CA signs exactly these names and extensions with the CSR's public key. CLM signs
    every other field with its approval key (`approval`, `approval_key_id`; see hapki.runtime.approval for the
    signed bytes); the CA refuses a request without a valid approval, and re-checks the content against its own
    copy of the profiles.
    """

    request_id: RequestId
    profile: str = Field(max_length=64)
    csr_pem: str = Field(max_length=MAX_CSR_CHARS)
    common_name: str | None = Field(default=None, max_length=64, description="Subject CN, one of the SANs")
    dns_names: list[str] = Field(default_factory=list, max_length=100)
    ip_addresses: list[str] = Field(default_factory=list, max_length=100)
    emails: list[str] = Field(default_factory=list, max_length=100)
    validity_seconds: int = Field(gt=0, le=398 * 86400, description="Lifetime of the certificate, seconds")
    key_usage: list[str] = Field(description="KeyUsage bits by cryptography's attribute names, e.g. digital_signature")
    extended_key_usage: list[str] = Field(description="EKU names: server_auth, client_auth")
    approval: str | None = Field(
        default=None, max_length=128, pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="CLM's signature (base64: ECDSA P-256 DER, up to 72 bytes, or Ed25519, 64 bytes; the algorithm is "
        "the named key's) over every other field of this message, the CSR by "
        "its SHA-256 (canonical form: hapki.runtime.approval.approval_payload). Required by the CA; optional in "
        "the schema only so that requests queued before approvals existed parse and are refused with "
        "APPROVAL_INVALID instead of being dropped",
    )
    approval_key_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{16}$",
        description="Which CLM approval key signed: the first 8 bytes of the SHA-256 of its raw public key "
        "(a P-256 key's uncompressed point, an Ed25519 key's 32 bytes), 16 lowercase hex digits",
    )


class CertificateIssued(_Model):
    """Event from CARA (`pki.v1.cara.issued`): a request's certificate is signed and stored."""

    request_id: RequestId
    serial: SerialHex
    issuer: str
    certificate_pem: str
    chain_pem: str
    not_before: datetime
    not_after: datetime


class SigningFailed(_Model):
    """Event from CARA (`pki.v1.cara.failed`): the CA refused a request for good."""

    request_id: RequestId
    error: ErrorBody


class HARole(str, enum.Enum):
    """A member's role in its tier."""

    ACTIVE = "active"  # holds the tier's floating IP and its service serves
    PASSIVE = "passive"  # does not hold the floating IP; hot standby
    FAULT = "fault"  # its local service is down or unhealthy


class HAEvent(_Model):
    """Event from a watcher (`pki.v1.ha.events.<tier>.<member>`, kept in stream PKI_HA_EVENTS): a role change."""

    tier: str = Field(description="cara or clm")
    member: str = Field(description="Member name, e.g. cara-1")
    vip: str = Field(description="The tier's floating IP address")
    role: HARole
    holds_vip: bool = Field(description="Whether the kernel of this member has the floating IP now")
    epoch: int | None = Field(default=None, description="The tier's epoch this member works under (CARA), if known")
    observed_at: datetime = Field(description="When the watcher observed the change, UTC")
    reason: str = Field(description="Why the role changed, e.g. 'vip gained', 'service unreachable'")
    health: JsonObject = Field(default_factory=dict, description="The member's health report at that moment")
