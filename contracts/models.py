"""Pydantic models of every message on the hapki bus. Strict: unknown fields are refused.

Sizes are in characters of the JSON string values; times are UTC, timezone-aware.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from hapki.contracts.errors import ErrorCode

# A PEM CSR for RSA-8192 with a hundred SANs stays well under this; anything larger is refused unread.
MAX_CSR_CHARS = 32 * 1024
# Cap of one request message on the wire, in bytes, checked before parsing.
MAX_REQUEST_BYTES = 64 * 1024

RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="Request id: 32 lowercase hex digits")]
SerialHex = Annotated[
    str,
    Field(pattern=r"^[0-9a-f]{2,40}$", description="Certificate serial number, lowercase hex, at most 20 octets"),
]


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
    details: dict[str, Any] = Field(default_factory=dict, description="Machine-readable specifics (field, value, limit)")


class IssueCertificate(_Model):
    """Command to CLM (`pki.v1.clm.issue`): issue a certificate for this CSR under this profile."""

    csr_pem: str = Field(max_length=MAX_CSR_CHARS, description="PKCS#10 request, PEM (or base64 DER)")
    profile: str = Field(min_length=1, max_length=64, description="Certificate profile name, e.g. tls-server")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Client-chosen key; a repeat with the same key and requester returns the original result",
    )
    requester: str = Field(min_length=1, max_length=128, description="Who asks (an account or service name)")


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
    requester: str = Field(min_length=1, max_length=128, description="Who asks (an account or service name)")


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


class SignCertificate(_Model):
    """Command from CLM to CARA on the signing work queue (`pki.v1.cara.sign`), Nats-Msg-Id = request_id.

    Carries what CLM approved: the CA signs exactly these names and extensions with the CSR's public key.
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
    health: dict[str, Any] = Field(default_factory=dict, description="The member's health report at that moment")
