"""A typed NATS client of the CLM API, with W3C trace context in the request headers."""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import TypeVar

import nats
import nats.errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.client import Client
from opentelemetry import trace
from pydantic import BaseModel

from hapki.contracts import subjects
from hapki.contracts.models import (
    CertificateQuery,
    CertificateReply,
    IssueCertificate,
    IssueReply,
    RenewCertificate,
    RevokeCertificate,
    RevokeReply,
    SearchCertificates,
    SearchReply,
    StatusQuery,
)
from hapki.runtime import bus, telemetry
from hapki.runtime.config import NatsConfig

R = TypeVar("R", bound=BaseModel)
tracer = trace.get_tracer("hapki.client")
log = logging.getLogger("hapki.client")
# Least seconds between two moves to another server after "no responders" (ClmClient._move_off_server).
MOVE_GAP_SECONDS = 5.0


class ClmClient:
    """Request/reply calls to CLM. Replies are parsed into contract models (errors arrive as `.error`)."""

    def __init__(self, nc: Client, timeout: float = 30.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._moved_at: float | None = None

    @classmethod
    async def connect(cls, servers: list[str] | NatsConfig, timeout: float = 30.0) -> ClmClient:
        """Connect to `servers`, or as the client user of a NatsConfig (credentials, TLS, its own inbox)."""
        if isinstance(servers, NatsConfig):
            return cls(await nats.connect(**bus.round_robin(servers.servers), name="hapki-client", error_cb=_bus_error,
                                          connect_timeout=servers.connect_timeout_seconds,
                                          **bus.connect_options(servers)), timeout)
        return cls(await nats.connect(**bus.round_robin(servers), name="hapki-client", error_cb=_bus_error), timeout)

    async def close(self) -> None:
        await self._nc.close()

    async def _call(self, subject: str, body: BaseModel, reply: type[R], timeout: float | None = None) -> R:
        try:
            msg = await self._nc.request(
                subject, body.model_dump_json().encode(), timeout=timeout or self._timeout, headers=telemetry.inject()
            )
        except nats.errors.NoRespondersError:
            await self._move_off_server()
            raise
        return reply.model_validate_json(msg.data)

    async def _move_off_server(self) -> None:
        """No CLM answers on the server this client is on: that server may be cut off from the cluster (CLM is
        reached through the others). The next call goes through another server of the list, if it has one;
        at most once per MOVE_GAP_SECONDS (while no CLM runs at all, every server says the same)."""
        now = time.monotonic()
        if len(self._nc.servers) < 2 or (self._moved_at is not None and now - self._moved_at < MOVE_GAP_SECONDS):
            return
        self._moved_at = now
        log.warning("no CLM responder through %s: reconnecting to another server",
                    self._nc.connected_url.netloc if self._nc.connected_url else "?")
        await self._nc.force_reconnect()

    async def issue(self, request: IssueCertificate, timeout: float | None = None) -> IssueReply:
        """Issue (or, with the same idempotency key, ask again); `timeout` overrides the client's, seconds."""
        with tracer.start_as_current_span("client.issue", kind=trace.SpanKind.CLIENT):
            return await self._call(subjects.CLM_ISSUE, request, IssueReply, timeout)

    async def status(self, request_id: str) -> IssueReply:
        return await self._call(subjects.CLM_STATUS, StatusQuery(request_id=request_id), IssueReply)

    async def certificate(self, serial: str) -> CertificateReply:
        return await self._call(subjects.CLM_CERTIFICATE, CertificateQuery(serial=serial), CertificateReply)

    async def revoke(self, request: RevokeCertificate) -> RevokeReply:
        with tracer.start_as_current_span("client.revoke", kind=trace.SpanKind.CLIENT):
            return await self._call(subjects.CLM_REVOKE, request, RevokeReply)

    async def search(self, query: SearchCertificates) -> SearchReply:
        return await self._call(subjects.CLM_SEARCH, query, SearchReply)

    async def renew(self, request: RenewCertificate, timeout: float | None = None) -> IssueReply:
        with tracer.start_as_current_span("client.renew", kind=trace.SpanKind.CLIENT):
            return await self._call(subjects.CLM_RENEW, request, IssueReply, timeout)

    async def raw(self, subject: str, data: bytes) -> bytes:
        """Send arbitrary bytes (for tests and diagnostics)."""
        return (await self._nc.request(subject, data, timeout=self._timeout)).data


def new_key_and_csr(names: list[str]) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a CSR for `names` (CN = the first); returns (csr PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.RFC822Name(name) if "@" in name else x509.DNSName(name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    )
    csr = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


async def _bus_error(exc: Exception) -> None:
    """A lost or refused server connection while the client reconnects: one line, not nats-py's traceback."""
    log.warning("nats: %s: %s", type(exc).__name__, exc)
