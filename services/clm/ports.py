"""The ports CLM's core needs, as Protocols. Adapters: store.MariaDBRequestStore, the JetStream publisher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from hapki.contracts.models import (
    CertificateReply,
    CertificateRevoked,
    IssueReply,
    RevokeReply,
    SearchCertificates,
    SearchReply,
    SignCertificate,
)


@dataclass(frozen=True)
class NewRequest:
    """A validated request, about to be recorded."""

    request_id: str
    requester: str
    idempotency_key: str | None
    profile: str
    csr_sha256: str
    approved: SignCertificate
    renews_serial: str | None = None  # a renewal: the predecessor's serial


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

    async def renewal_by_key(self, requester: str, idempotency_key: str) -> tuple[str, str | None] | None: ...


class RevocationStore(Protocol):
    """The revocation calls CLM makes on its database."""

    async def revoke(self, serial: str, reason: str, requester: str, now: datetime) -> RevokeReply: ...


@dataclass(frozen=True)
class Predecessor:
    """An issued certificate as a renewal needs it."""

    serial: str
    request_id: str
    requester: str
    profile: str
    revoked: bool
    approved: SignCertificate


@dataclass(frozen=True)
class ExpiryNotice:
    """A recorded expiry notice: the stored CertificateExpiring message and its de-duplication id."""

    issuer: str
    serial: str
    window_seconds: int
    event_json: str

    @property
    def msg_id(self) -> str:
        return f"{self.issuer}:{self.serial}:{self.window_seconds}"


@dataclass(frozen=True)
class ExpiryBatch:
    """One batch of the expiry scheduler: certificates looked at, notices newly recorded, whether more wait."""

    examined: int
    recorded: int
    more: bool


class InventoryStore(Protocol):
    """The inventory calls CLM makes on its database: search, renewal look-up, expiry notices."""

    async def search(self, query: SearchCertificates, now: datetime) -> SearchReply: ...

    async def predecessor(self, serial: str) -> Predecessor: ...

    async def record_expiring(self, windows_seconds: Sequence[int], now: datetime, limit: int) -> ExpiryBatch: ...

    async def unpublished_notices(self, limit: int) -> list[ExpiryNotice]: ...

    async def mark_published(self, notices: list[ExpiryNotice], now: datetime) -> None: ...


class ExpiryPublisher(Protocol):
    """Where expiry notices go: a stream that drops a second message with the same id."""

    async def expiring(self, notice: ExpiryNotice) -> None: ...


class SigningQueue(Protocol):
    """Where approved requests go to the CA."""

    async def submit(self, request: SignCertificate) -> None: ...


class EventPublisher(Protocol):
    """Where CLM's events go (core NATS: best effort, the database stays the truth)."""

    async def revoked(self, event: CertificateRevoked) -> None: ...
