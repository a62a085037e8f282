"""The ports CARA's core needs, as Protocols. Adapters: store.MariaDBSigningStore, hapki.runtime.hsm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509

from hapki.contracts.models import ErrorBody, SignCertificate


@dataclass(frozen=True)
class IssuerRecord:
    """An issuing CA as stored: its certificate, chain (issuer first, up to the root) and HSM key id."""

    name: str
    cert_pem: str
    chain_pem: str
    key_id: bytes
    revoked_at: datetime | None = None  # revoked by its root (`hapki ca revoke-issuer`): on the ARL
    revocation_reason: str | None = None  # cryptography x509.ReasonFlags name

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
class Intent:
    """A signing intent to reserve: the serial drawn for one request, before the HSM is asked."""

    intent_id: str
    request_id: str
    issuer: str
    serial: str


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

    async def reserved_intents(self) -> tuple[int, datetime | None]:
        """How many signing intents are reserved (not resolved), and when the oldest was created (None: none)."""
        ...

    async def outcome(self, request_id: str) -> Outcome: ...

    async def outcomes(self, request_ids: Sequence[str]) -> dict[str, Outcome]:
        """What is final for each request, in one read; requests with nothing final yet are left out."""
        ...

    async def reserve(
        self, *, intent_id: str, request_id: str, issuer: str, serial: str, epoch: int, member: str, now: datetime
    ) -> None: ...

    async def reserve_batch(self, intents: Sequence[Intent], *, epoch: int, member: str, now: datetime) -> None:
        """Reserve every intent (and its serial) in one fenced transaction; DuplicateKey on a serial collision."""
        ...

    async def record_issued(self, record: IssuedRecord, *, epoch: int, now: datetime) -> IssuedRecord: ...

    async def record_issued_batch(
        self, records: Sequence[IssuedRecord], *, epoch: int, now: datetime
    ) -> list[IssuedRecord | None]:
        """Store every certificate in one fenced transaction; per record what is stored for its request, or None
        when its intent is no longer reserved (another attempt for the request superseded it)."""
        ...

    async def refuse(self, request: SignCertificate, error: ErrorBody, *, epoch: int, now: datetime) -> bool: ...

    async def abandon_intent(self, intent_id: str, reason: str, now: datetime) -> None: ...


@dataclass(frozen=True)
class CrlEntry:
    """One revoked certificate as a CRL lists it. `reason` is a cryptography x509.ReasonFlags name."""

    serial: str
    revoked_at: datetime
    reason: str


@dataclass(frozen=True)
class CrlRecord:
    """A signed CRL as stored: full, or delta relative to full CRL `base`."""

    issuer: str
    number: int
    delta: bool
    base: int | None
    entries: int
    this_update: datetime
    next_update: datetime
    der: bytes


@dataclass(frozen=True)
class CrlSchedule:
    """What decides the next CRL: when the latest of each kind was made, and whether revocations await a CRL."""

    full_at: datetime | None
    delta_at: datetime | None
    unlisted: bool  # some revocation is on no full CRL yet


@dataclass(frozen=True)
class SerialStatus:
    """What the database says about a serial: unknown (never issued here), good, or revoked (time, reason)."""

    known: bool
    revoked_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class OcspSignerRecord:
    """An issuer's delegated OCSP responder: certificate (PEM) and the CKA_ID of its key in the HSM."""

    issuer: str
    cert_pem: str
    key_id: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())
