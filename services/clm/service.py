"""The CLM service: validates issue requests, records them, queues them for the CA and answers with the result."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from opentelemetry import trace

from hapki.clm import inventory
from hapki.runtime import metrics, telemetry, validation
from hapki.runtime.approval import ApprovalKey
from hapki.runtime.ids import time_ordered_id
from hapki.clm.ports import (
    EventPublisher,
    InventoryStore,
    NewRequest,
    Predecessor,
    Rejection,
    RequestStore,
    RevocationStore,
    SigningQueue,
)
from hapki.clm.ratelimit import RateLimiter
from hapki.contracts.errors import (
    ErrorCode,
    ForbiddenReason,
    HapkiError,
    NotRenewable,
    RateLimited,
    RequesterMismatch,
    Unavailable,
)
from hapki.runtime.profiles import Profile
from hapki.contracts.models import (
    CertificateIssued,
    FORBIDDEN_REASONS,
    CertificateQuery,
    CertificateReply,
    CertificateRevoked,
    ErrorBody,
    IssueCertificate,
    IssueReply,
    RenewCertificate,
    RequestStatus,
    RevokeCertificate,
    RevokeReply,
    SearchCertificates,
    SearchReply,
    SigningFailed,
    StatusQuery,
)

log = logging.getLogger("hapki.clm")
# Recently given final answers kept per (requester, idempotency key) for retries: how long and how many. A retry
# after that is answered from the database (the record is idempotent); each kept answer is ~1.5 KiB (_Answered:
# the certificate, ~0.9 KiB, and the small fields; the issuer's chain is shared), so at 170 issuances/s a minute of
# them is ~15 MiB of CLM's memory. The count bounds it whatever the rate: 10,000 answers are ~15 MiB (40 s of
# answers at 250/s; clients retry within seconds).
ANSWERED_TTL_SECONDS = 60.0
ANSWERED_MAX = 10_000
tracer = trace.get_tracer("hapki.clm")
_ISSUANCE = metrics.counter("hapki.clm.issuance")
_ISSUANCE_SECONDS = metrics.histogram("hapki.clm.issuance.duration")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Answered:
    """A final answer kept for retries: the request's digest and profile, its expiry, and the reply's fields. Not the
    IssueReply itself: a pydantic model's __dict__ and fields-set cost about 1 KiB more per answer, 10 MB of CLM's
    memory at ANSWERED_MAX (docs/PERFORMANCE-HISTORY.md, Session 9)."""

    digest: str
    profile: str | None
    expires: float
    request_id: str | None
    status: RequestStatus | None
    certificate_pem: str | None
    chain_pem: str | None
    serial: str | None
    not_before: datetime | None
    not_after: datetime | None
    error: ErrorBody | None

    @classmethod
    def of(cls, digest: str, profile: str | None, reply: IssueReply, expires: float) -> _Answered:
        return cls(digest, profile, expires, reply.request_id, reply.status, reply.certificate_pem, reply.chain_pem,
                   reply.serial, reply.not_before, reply.not_after, reply.error)

    def answers(self, digest: str, profile: str | None, now: float) -> bool:
        """Whether a retry with this CSR digest and profile gets this answer at monotonic time `now`."""
        return (self.digest, self.profile) == (digest, profile) and self.expires > now

    def reply(self) -> IssueReply:
        # The fields of a validated reply: no validation again.
        return IssueReply.model_construct(
            request_id=self.request_id, status=self.status, certificate_pem=self.certificate_pem,
            chain_pem=self.chain_pem, serial=self.serial, not_before=self.not_before, not_after=self.not_after,
            error=self.error)


class ClmService:
    """Request handlers of the RA. Transport-free: the FastStream app in app.py calls these."""

    def __init__(
        self,
        *,
        store: RequestStore,
        queue: SigningQueue,
        revocations: RevocationStore,
        events: EventPublisher,
        inventory: InventoryStore,
        profiles: Mapping[str, Profile],
        approver: ApprovalKey,
        clock: Callable[[], datetime],
        wait_seconds: float,
        limiter: RateLimiter | None = None,
        member: str = "-",
    ) -> None:
        self._store, self._queue, self._profiles, self._approver = store, queue, profiles, approver
        self._limiter = limiter  # per-requester token buckets (None: no limit, as in unit tests of other rules)
        self._revocations, self._events, self._inventory = revocations, events, inventory
        self._clock, self._wait = clock, wait_seconds
        self._member = member  # the pki.member attribute of this service's metrics
        self._waiters: dict[str, list[asyncio.Future[IssueReply]]] = {}
        # Issue calls in progress here by (requester, idempotency key), with the CSR digest and profile they carry.
        self._inflight: dict[tuple[str, str], tuple[str, str, asyncio.Task[IssueReply]]] = {}
        # Final answers given here recently, by the same key: a client whose attempt timed out just before the
        # answer came retries, and must not cost two more transactions while the database drains a backlog.
        self._answered: OrderedDict[tuple[str, str], _Answered] = OrderedDict()

    async def issue(self, request: IssueCertificate) -> IssueReply:
        """Validate, record (idempotently), queue for the CA, and wait for the result up to wait_seconds.

        A client retry that arrives while its earlier attempt is still being handled here joins that attempt
        instead of starting another one: when the database or the CA is slow, clients retry, and without this
        every retry would queue one more transaction behind the stall (the backlog then drains for seconds after
        the database is back). A retry with another CSR or profile under the same key is not joined: the store
        answers it with IDEMPOTENCY_CONFLICT as usual.
        """
        async def answer() -> IssueReply:
            digest = _sha256(request.csr_pem)
            self._admit(request.requester, request.idempotency_key, digest, request.profile)
            return await self._once_per_key(request, None, digest)

        with telemetry.span(tracer, "clm.issue"):
            return await self._measured(request.profile, answer)

    async def renew(self, request: RenewCertificate) -> IssueReply:
        """A new certificate for exactly the names of an issued, unrevoked one, by its requester; then as issue."""
        with telemetry.span(tracer, "clm.renew") as span:
            return await self._measured(request.profile, lambda: self._renew(request, span))

    async def _renew(self, request: RenewCertificate, span: trace.Span) -> IssueReply:
        serial = request.serial.lower()
        span.set_attribute("pki.serial", serial)
        digest = _sha256(request.csr_pem)
        self._admit(request.requester, request.idempotency_key, digest, request.profile)
        predecessor = await self._inventory.predecessor(serial)
        if predecessor.requester != request.requester:
            raise RequesterMismatch(
                f"certificate {serial} was requested by another requester; only it may renew it",
                {"field": "requester", "serial": serial},
            )
        if predecessor.revoked:
            # A repeat of a renewal that was accepted before the predecessor was revoked (often: revoked as
            # superseded right after) answers like any repeat: with the original request.
            if request.idempotency_key is not None:
                earlier = await self._store.renewal_by_key(request.requester, request.idempotency_key)
                if earlier is not None and earlier[1] == serial:
                    return await self._store.view(earlier[0])
            raise NotRenewable(f"certificate {serial} is revoked; request a new certificate instead",
                               {"field": "serial", "serial": serial, "reason": "revoked"})
        return await self._once_per_key(IssueCertificate(
            csr_pem=request.csr_pem, profile=request.profile or predecessor.profile,
            requester=request.requester, idempotency_key=request.idempotency_key,
        ), predecessor, digest)

    async def _measured(self, profile: str | None, answer: Callable[[], Awaitable[IssueReply]]) -> IssueReply:
        """`answer()`, counted and timed by profile and outcome (issued, pending, failed, rejected + error code).

        The profile label is a configured profile name or "other": a client-chosen string must not create series.
        """
        began = time.perf_counter()
        outcome, error = "rejected", ErrorCode.INTERNAL.value
        try:
            reply = await answer()
            outcome = reply.status.value if reply.status is not None else "rejected"
            error = reply.error.code.value if reply.error is not None else ""
            return reply
        except HapkiError as exc:
            error = exc.code.value
            raise
        finally:
            attributes = {"pki.member": self._member, "pki.outcome": outcome,
                          "pki.profile": profile if profile in self._profiles else ("default" if profile is None
                                                                                    else "other")}
            _ISSUANCE.add(1, {**attributes, "pki.error": error})
            _ISSUANCE_SECONDS.record(time.perf_counter() - began, attributes)

    async def search(self, query: SearchCertificates) -> SearchReply:
        """One page of the certificate inventory."""
        with telemetry.span(tracer, "clm.search"):
            return await self._inventory.search(query, self._clock())

    def _admit(self, requester: str, key: str | None, digest: str, profile: str | None) -> None:
        """Take a token from the requester's bucket, or raise RateLimited; before any parsing or database work.

        A retry of an attempt in progress here, or of one answered here recently (same key, CSR and profile),
        costs no token: it costs no work either (see _once_per_key), and a client retrying after a timeout must
        not be limited for the server's slowness. (A renewal retry without a profile does not match, since its
        attempt ran under the predecessor's profile: it is charged like a new request; rare and harmless.)
        """
        if self._limiter is None:
            return
        if key is not None:
            answered = self._answered.get((requester, key))
            running = self._inflight.get((requester, key))
            if (answered is not None and answered.answers(digest, profile, time.monotonic())) or (
                    running is not None and running[:2] == (digest, profile)):
                return
        try:
            self._limiter.check(requester)
        except RateLimited as exc:
            trace.get_current_span().set_attribute("pki.rate_limited", True)
            log.info("requester %r rate limited (retry after %.3f s)", requester, exc.retry_after)
            raise

    async def _once_per_key(self, request: IssueCertificate, predecessor: Predecessor | None,
                            digest: str) -> IssueReply:
        """Run `_issue`, or join the run already in progress here for the same requester and key (see issue).

        `digest`: SHA-256 of the CSR text (hex), computed once per call and used for every comparison and record.
        """
        if request.idempotency_key is None:
            return await self._issue(request, predecessor, digest)
        key = (request.requester, request.idempotency_key)
        answered = self._answered.get(key)
        if answered is not None and answered.answers(digest, request.profile, time.monotonic()):
            trace.get_current_span().add_event("clm.answered_before")
            return answered.reply()
        running = self._inflight.get(key)
        if running is not None and running[:2] == (digest, request.profile):
            trace.get_current_span().add_event("clm.joined_attempt")
            return await asyncio.shield(running[2])
        task = asyncio.ensure_future(self._issue(request, predecessor, digest))
        self._inflight[key] = (digest, request.profile, task)
        task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: a client that gives up (its connection closed) does not cancel the work others may join.
        return await asyncio.shield(task)

    def _forget(self, key: tuple[str, str], task: asyncio.Task[IssueReply]) -> None:
        running = self._inflight.get(key)
        if running is None or running[2] is not task:
            return
        del self._inflight[key]
        if task.cancelled() or task.exception() is not None:
            return
        reply = task.result()
        if reply.status in (RequestStatus.ISSUED, RequestStatus.FAILED):  # final: the same answer forever
            now = time.monotonic()
            self._answered[key] = _Answered.of(running[0], running[1], reply, now + ANSWERED_TTL_SECONDS)
            self._answered.move_to_end(key)
            # Kept in expiry order (one TTL, appended at the end), so the expired ones are at the front: dropped here,
            # or CLM would hold ANSWERED_MAX answers (certificates included) at any rate.
            while self._answered and (len(self._answered) > ANSWERED_MAX
                                      or next(iter(self._answered.values())).expires <= now):
                self._answered.popitem(last=False)

    async def _issue(self, request: IssueCertificate, predecessor: Predecessor | None, csr_sha256: str) -> IssueReply:
        span = trace.get_current_span()
        span.set_attribute("pki.profile", request.profile)
        request_id = time_ordered_id()
        with telemetry.span(tracer, "clm.validate"):
            try:
                approved = validation.approve(request, self._profiles, request_id)
                if predecessor is not None:
                    inventory.require_same_names(predecessor.approved, approved)
            except HapkiError as exc:
                await self._audit_rejection(request, csr_sha256, exc)
                raise
            # Signed before it is recorded: the stored copy (the outbox) carries the approval, so a republish does too.
            approved = self._approver.sign(approved)
        recorded = await self._store.record(
            NewRequest(
                request_id=request_id, requester=request.requester, idempotency_key=request.idempotency_key,
                profile=request.profile, csr_sha256=csr_sha256,
                approved=approved, renews_serial=predecessor.serial if predecessor is not None else None,
            ),
            self._clock(),
        )
        span.set_attribute("pki.request_id", recorded.request_id)
        span.set_attribute("pki.replay", not recorded.created)
        waiter = self._register(recorded.request_id)
        try:
            if not recorded.created:
                current = await self._store.view(recorded.request_id)
                if current.status is not RequestStatus.PENDING:
                    return current
            # A replayed pending request is queued again: if its first publish was lost, this recovers it;
            # otherwise JetStream's de-duplication (Nats-Msg-Id) and CARA's database checks absorb it.
            try:
                await self._queue.submit(recorded.approved)
            except Unavailable as exc:
                # Recorded but not queued: the outbox sweep (or the client's retry) will queue it.
                log.warning("request %s recorded but not queued yet: %s", recorded.request_id, exc)
                return await self._store.view(recorded.request_id)
            return await self._await_result(recorded.request_id, waiter)
        finally:
            self._unregister(recorded.request_id, waiter)

    async def _audit_rejection(self, request: IssueCertificate, csr_sha256: str, exc: HapkiError) -> None:
        """Record a policy refusal of a well-formed request; garbage is only logged (see validation.is_well_formed).

        Best effort: the client gets its refusal even when the database is down (nothing else changed state).
        """
        if not validation.is_well_formed(request.csr_pem):
            return
        try:
            await self._store.record_rejection(
                Rejection(requester=request.requester, profile=request.profile, csr_sha256=csr_sha256,
                          code=exc.code.value, message=exc.message), self._clock())
        except HapkiError as failure:
            log.warning("refusal of a request by %s not audited: %s", request.requester, failure)

    async def status(self, query: StatusQuery) -> IssueReply:
        with telemetry.span(tracer, "clm.status"):
            return await self._store.view(query.request_id)

    async def certificate(self, query: CertificateQuery) -> CertificateReply:
        with telemetry.span(tracer, "clm.certificate"):
            return await self._store.certificate(query.serial.lower())

    async def revoke(self, request: RevokeCertificate) -> RevokeReply:
        """Record a revocation (idempotent by serial and reason), then tell CARA so it regenerates its CRLs."""
        with telemetry.span(tracer, "clm.revoke") as span:
            serial = request.serial.lower()
            span.set_attribute("pki.serial", serial)
            span.set_attribute("pki.revocation_reason", request.reason.value)
            self._admit(request.requester, None, "", None)
            if request.reason in FORBIDDEN_REASONS:
                raise ForbiddenReason(
                    f"revocation reason {request.reason.value} is not accepted: revocations are final (no holds)"
                    " and the CA/ AA compromise reasons do not apply to subscriber certificates",
                    {"reason": request.reason.value,
                     "allowed": sorted(r.value for r in type(request.reason) if r not in FORBIDDEN_REASONS)},
                )
            reply = await self._revocations.revoke(serial, request.reason.value, request.requester, self._clock())
            assert reply.issuer is not None and reply.reason is not None and reply.revoked_at is not None
            # Published for repeats too: if the first event was lost, this one still wakes CARA. Best effort:
            # the revocation is recorded, and CARA also finds revocations missing from its CRLs by polling.
            try:
                await self._events.revoked(CertificateRevoked(
                    issuer=reply.issuer, serial=serial, reason=reply.reason, revoked_at=reply.revoked_at))
            except HapkiError as exc:
                log.warning("revocation of %s recorded, event not published: %s", serial, exc)
            return reply

    def on_issued(self, event: CertificateIssued) -> None:
        """A CARA result event: wake whoever waits for this request here."""
        self._resolve(
            event.request_id,
            IssueReply(
                request_id=event.request_id, status=RequestStatus.ISSUED, certificate_pem=event.certificate_pem,
                # One copy of each issuer's chain, not one per answer kept for retries (see ANSWERED_TTL_SECONDS).
                chain_pem=sys.intern(event.chain_pem), serial=event.serial, not_before=event.not_before,
                not_after=event.not_after,
            ),
        )

    def on_failed(self, event: SigningFailed) -> None:
        self._resolve(
            event.request_id,
            IssueReply(request_id=event.request_id, status=RequestStatus.FAILED, error=event.error),
        )

    async def republish_stale(self, older_than: timedelta, limit: int = 500) -> int:
        """Outbox sweep: queue again requests still pending after `older_than` (a publish may have been lost)."""
        stale = await self._store.stale_pending(self._clock() - older_than, limit)
        for approved in stale:
            await self._queue.submit(approved)
        if stale:
            log.info("republished %d pending requests", len(stale))
        return len(stale)

    def _register(self, request_id: str) -> asyncio.Future[IssueReply]:
        future: asyncio.Future[IssueReply] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        return future

    def _unregister(self, request_id: str, future: asyncio.Future[IssueReply]) -> None:
        futures = self._waiters.get(request_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiters.pop(request_id, None)

    def _resolve(self, request_id: str, reply: IssueReply) -> None:
        for future in self._waiters.get(request_id, []):
            if not future.done():
                future.set_result(reply)

    async def _await_result(self, request_id: str, waiter: asyncio.Future[IssueReply]) -> IssueReply:
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout=self._wait)
        except asyncio.TimeoutError:
            # The event may have gone to a member that restarted, or the CA is failing over: the database knows.
            return await self._store.view(request_id)
