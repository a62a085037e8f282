"""Error codes of the hapki contracts and the one exception tree that carries them.

Codes are part of the wire contract: never reuse or renumber a retired value; add new ones at the end.
Each exception class names one code and says whether a retry can succeed (NAK vs term on the bus).
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    """Every error a hapki reply can carry."""

    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"  # not JSON, wrong types, missing or unknown fields
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"  # request body or CSR over the size cap
    MALFORMED_CSR = "MALFORMED_CSR"  # not a parseable PEM/DER PKCS#10 request
    BAD_CSR_SIGNATURE = "BAD_CSR_SIGNATURE"  # the CSR's self-signature does not verify
    KEY_POLICY_VIOLATION = "KEY_POLICY_VIOLATION"  # key type, curve or size not allowed
    INVALID_NAME = "INVALID_NAME"  # a subject or SAN value is syntactically invalid
    FORBIDDEN_NAME = "FORBIDDEN_NAME"  # a well-formed name the profile does not allow
    UNKNOWN_PROFILE = "UNKNOWN_PROFILE"  # no such certificate profile
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"  # key reused for a different request
    NOT_FOUND = "NOT_FOUND"  # no request / certificate with that id / serial
    UNAVAILABLE = "UNAVAILABLE"  # a dependency (database, bus, HSM) is down; retry later
    SIGNING_REJECTED = "SIGNING_REJECTED"  # the CA refused to sign what CLM sent
    INTERNAL = "INTERNAL"  # a bug; details are in the logs under the trace id
    ALREADY_REVOKED = "ALREADY_REVOKED"  # the certificate is revoked already, with another reason
    FORBIDDEN_REASON = "FORBIDDEN_REASON"  # a revocation reason this CA does not accept (e.g. certificate_hold)
    INVALID_CURSOR = "INVALID_CURSOR"  # a search cursor this service did not make (garbage or tampered)
    NOT_RENEWABLE = "NOT_RENEWABLE"  # the certificate to renew is revoked
    REQUESTER_MISMATCH = "REQUESTER_MISMATCH"  # a renewal asked by another requester than the predecessor's
    NAMES_MISMATCH = "NAMES_MISMATCH"  # a renewal CSR whose names are not exactly the predecessor's
    RATE_LIMITED = "RATE_LIMITED"  # this requester sent more than its rate allows; details.retry_after_seconds
    APPROVAL_INVALID = "APPROVAL_INVALID"  # a signing request without a valid CLM approval signature (CA refuses)
    POLICY_VIOLATION = "POLICY_VIOLATION"  # approved content the CA's own profile check refuses


class HapkiError(Exception):
    """Base of every error hapki raises on purpose. `code` goes on the wire, `details` too."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class MalformedMessage(HapkiError):
    code = ErrorCode.MALFORMED_MESSAGE


class MessageTooLarge(HapkiError):
    code = ErrorCode.MESSAGE_TOO_LARGE


class MalformedCSR(HapkiError):
    code = ErrorCode.MALFORMED_CSR


class BadCSRSignature(HapkiError):
    code = ErrorCode.BAD_CSR_SIGNATURE


class KeyPolicyViolation(HapkiError):
    code = ErrorCode.KEY_POLICY_VIOLATION


class InvalidName(HapkiError):
    code = ErrorCode.INVALID_NAME


class ForbiddenName(HapkiError):
    code = ErrorCode.FORBIDDEN_NAME


class UnknownProfile(HapkiError):
    code = ErrorCode.UNKNOWN_PROFILE


class IdempotencyConflict(HapkiError):
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class NotFound(HapkiError):
    code = ErrorCode.NOT_FOUND


class Unavailable(HapkiError):
    """A dependency is down or not ready. Retrying (elsewhere, later) can succeed."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class SigningRejected(HapkiError):
    code = ErrorCode.SIGNING_REJECTED


class Internal(HapkiError):
    code = ErrorCode.INTERNAL


class AlreadyRevoked(HapkiError):
    code = ErrorCode.ALREADY_REVOKED


class ForbiddenReason(HapkiError):
    code = ErrorCode.FORBIDDEN_REASON


class InvalidCursor(HapkiError):
    code = ErrorCode.INVALID_CURSOR


class NotRenewable(HapkiError):
    code = ErrorCode.NOT_RENEWABLE


class RequesterMismatch(HapkiError):
    code = ErrorCode.REQUESTER_MISMATCH


class NamesMismatch(HapkiError):
    code = ErrorCode.NAMES_MISMATCH


class RateLimited(HapkiError):
    """Over this requester's rate: nothing was done; the same request after `retry_after_seconds` can succeed."""

    code = ErrorCode.RATE_LIMITED
    retryable = True

    def __init__(self, message: str, details: dict[str, Any] | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message, {**(details or {}), "retry_after_seconds": round(retry_after, 3)})
        self.retry_after = retry_after
class ApprovalInvalid(SigningRejected):
    """The signing request carries no approval, or one that no trusted CLM approval key made over this content."""

    code = ErrorCode.APPROVAL_INVALID


class PolicyViolation(SigningRejected):
    """The CA's own re-check of the approved content against its profiles refused it."""

    code = ErrorCode.POLICY_VIOLATION


# Storage-level errors. They never cross a service edge as such: handlers map them to the codes above.
class DatabaseError(Unavailable):
    """The database could not run a transaction (no node ready, connection lost)."""


class CommitOutcomeUnknown(DatabaseError):
    """The connection died during COMMIT: the transaction may or may not have committed."""


class DuplicateKey(HapkiError):
    """A UNIQUE key refused a row (MariaDB 1062). Never retried as is."""

    code = ErrorCode.INTERNAL


class GuardFailed(HapkiError):
    """A fenced transaction's own commit condition (hapki.runtime.db.fence_guard) was false under a current epoch:
    nothing was committed. The body that set the guard handles it (its careful path); never an edge error."""

    code = ErrorCode.INTERNAL


class FencedOut(HapkiError):
    """This member's epoch is not the current one: it must not commit signing results and must step down."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class HSMUnavailable(Unavailable):
    """No HSM member could perform the operation."""


class ConfigInvalid(HapkiError):
    """A service's config file (missing, not TOML, not what its model asks) or an environment override cannot be
    used. Raised at the start, before anything connects; `hapki serve` prints it as one line and exits 2."""

    code = ErrorCode.INTERNAL


class BackupRefused(HapkiError):
    """`hapki db backup` or `hapki db restore` cannot do what was asked (a dump that failed, a file that is not the
    one its manifest names, a restore onto a database that holds a site's data): nothing was changed. An operator
    acts; never retried."""

    code = ErrorCode.INTERNAL


class ProvisioningRefused(HapkiError):
    """The database refused an administrative step (`hapki db migrate` applying grants): a missing account or a
    privilege the admin lacks. Never retried: an operator has to act."""

    code = ErrorCode.INTERNAL
