"""The ports CARA's core needs, as Protocols. Adapters: store.MariaDBSigningStore, hapki.runtime.hsm."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509

from hapki.contracts.models import ErrorBody


@dataclass(frozen=True)
class IssuerRecord:
    """An issuing CA as stored: its certificate, chain (issuer first, up to the root) and HSM key id."""

    name: str
    cert_pem: str
    chain_pem: str
    key_id: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())


@dataclass(frozen=True)
class IssuedRecord:
    """A stored certificate."""

    request_id: str
    issuer: str
    serial: str
    intent_id: str
    cert_pem: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class Outcome:
    """What the database already knows about a request: issued, failed, or nothing final yet."""

    issued: IssuedRecord | None = None
    failed: ErrorBody | None = None


class SigningStore(Protocol):
    """The calls the CA makes on its database. Every write is fenced by the caller's epoch."""

    async def load_issuer(self, name: str | None) -> IssuerRecord: ...

    async def bump_epoch(self, member: str, now: datetime) -> int: ...

    async def abandon_stale_intents(self, epoch: int, now: datetime) -> int: ...

    async def outcome(self, request_id: str) -> Outcome: ...

    async def reserve(
        self, *, intent_id: str, request_id: str, issuer: str, serial: str, epoch: int, member: str, now: datetime
    ) -> None: ...

    async def record_issued(self, record: IssuedRecord, *, epoch: int, now: datetime) -> IssuedRecord: ...

    async def record_failed(self, request_id: str, error: ErrorBody, *, epoch: int, now: datetime) -> None: ...

    async def abandon_intent(self, intent_id: str, reason: str, now: datetime) -> None: ...
