"""The ports CLM's core needs, as Protocols. Adapters: store.MariaDBRequestStore, the JetStream publisher."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from hapki.contracts.models import CertificateReply, CertificateRevoked, IssueReply, RevokeReply, SignCertificate


@dataclass(frozen=True)
class NewRequest:
    """A validated request, about to be recorded."""

    request_id: str
    requester: str
    idempotency_key: str | None
    profile: str
    csr_sha256: str
    approved: SignCertificate


@dataclass(frozen=True)
class Recorded:
    """The request as stored: `created` is False when an earlier request with the same key was found."""

    request_id: str
    created: bool
    approved: SignCertificate


@dataclass(frozen=True)
class Rejection:
    """A well-formed request refused by policy (what the audit log records of it)."""

    requester: str
    profile: str
    csr_sha256: str
    code: str
    message: str


class RequestStore(Protocol):
    """The calls CLM makes on its database."""

    async def record(self, request: NewRequest, now: datetime) -> Recorded: ...

    async def record_rejection(self, rejection: Rejection, now: datetime) -> None: ...

    async def view(self, request_id: str) -> IssueReply: ...

    async def certificate(self, serial: str) -> CertificateReply: ...

    async def stale_pending(self, older_than: datetime, limit: int) -> list[SignCertificate]: ...


class RevocationStore(Protocol):
    """The revocation calls CLM makes on its database."""

    async def revoke(self, serial: str, reason: str, requester: str, now: datetime) -> RevokeReply: ...


class SigningQueue(Protocol):
    """Where approved requests go to the CA."""

    async def submit(self, request: SignCertificate) -> None: ...


class EventPublisher(Protocol):
    """Where CLM's events go (core NATS: best effort, the database stays the truth)."""

    async def revoked(self, event: CertificateRevoked) -> None: ...
