"""The wire contracts of hapki: every bus subject, message model and error code lives here."""

from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode, HapkiError
from hapki.contracts.models import (
    CertificateIssued,
    CertificateQuery,
    CertificateReply,
    ErrorBody,
    IssueCertificate,
    IssueReply,
    RequestStatus,
    SignCertificate,
    SigningFailed,
    StatusQuery,
)

__all__ = [
    "CertificateIssued",
    "CertificateQuery",
    "CertificateReply",
    "ErrorBody",
    "ErrorCode",
    "HapkiError",
    "IssueCertificate",
    "IssueReply",
    "RequestStatus",
    "SignCertificate",
    "SigningFailed",
    "StatusQuery",
    "subjects",
]
