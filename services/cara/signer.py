"""The CARA signer: consumes signing requests from JetStream and issues certificates through the HSM.

Active only between start() and stop() (the HA supervisor calls them on VIP changes). For each request:
Step 0: the request must carry a valid CLM approval (hapki.runtime.approval); else it is refused before anything
        is read, reserved or signed.
Step 1: a final outcome already stored (redelivery) is republished without signing again.
        Then the CSR is parsed again and the CA's own profile check runs (hapki.runtime.validation.recheck): the
        content must be exactly what this CA's profiles give that CSR. A refusal reserves and signs nothing.
Step 2: reserve a random serial and write the signing intent, fenced by our epoch, in one transaction.
Step 3: build the certificate and sign it through the HSM.
Step 4: store the certificate and mark the request issued, fenced again.
Step 5: ack the message, then publish the result.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from pydantic import ValidationError

from hapki.cara import issuance
from hapki.cara.config import SignerConfig
from hapki.cara.ports import IssuedRecord, IssuerRecord, SigningStore
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode, FencedOut, HapkiError, SigningRejected
from hapki.contracts.limits import MAX_SIGNING_REQUEST_BYTES
from hapki.contracts.models import CertificateIssued, ErrorBody, SignCertificate, SigningFailed
from hapki.runtime import telemetry, validation
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.faults import FailPoints
from hapki.runtime.profiles import Profile

log = logging.getLogger("hapki.cara.signer")
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
tracer = trace.get_tracer("hapki.cara")


class Signer:
    """Pull workers over the signing consumer, fenced by the CARA epoch."""

    def __init__(
        self,
        *,
        nc: Client,
        js: JetStreamContext,
        store: SigningStore,
        issuer: IssuerRecord,
        issuer_key: ec.EllipticCurvePrivateKey,
        member: str,
        config: SignerConfig,
        clock: Callable[[], datetime],
        approvals: ApprovalVerifier,
        profiles: Mapping[str, Profile],
        faults: FailPoints | None = None,
        distribution: issuance.Distribution | None = None,
    ) -> None:
        self._nc, self._js, self._store = nc, js, store
        self._approvals, self._profiles = approvals, profiles
        self._issuer, self._issuer_cert, self._key = issuer, issuer.certificate, issuer_key
        self._distribution = distribution  # CDP and AIA OCSP URLs put in every certificate, if any
        self._member, self._config, self._clock = member, config, clock
        self._faults = faults or FailPoints("")
        self._epoch: int | None = None
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._inflight: dict[str, Msg] = {}
        self._to_hand_back: list[Msg] = []  # fetched but not to be processed here: NAKed on the way out
        self._releasing: asyncio.Task[None] | None = None  # the hand-back after being fenced (kept referenced)
        self.fenced = asyncio.Event()  # set when a newer epoch fenced us out: the supervisor must step down
        self.signatures = 0  # HSM signatures made by this process (for tests and metrics)

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def issuer(self) -> IssuerRecord:
        """The issuing CA this signer signs for (name, certificate, chain)."""
        return self._issuer

    @property
    def issuer_key(self) -> ec.EllipticCurvePrivateKey:
        """The issuing CA's private key object (in the HSM; sign-only)."""
        return self._key

    @property
    def active(self) -> bool:
        return bool(self._workers) and not self._stopping.is_set()

    async def start(self) -> int:
        """Become active: bump the epoch (compare-and-set), resolve stale intents, start pulling."""
        if self.active:
            return self._epoch or 0
        if self._workers:
            await self.stop()  # fenced earlier: reap the old workers before new ones exist
        self._stopping.clear()
        self.fenced.clear()
        now = self._clock()
        self._epoch = await self._store.bump_epoch(self._member, now)
        abandoned = await self._store.abandon_stale_intents(self._epoch, now)
        log.info("signer %s active at epoch %d; %d stale intents abandoned", self._member, self._epoch, abandoned)
        self._workers = [asyncio.create_task(self._worker(i)) for i in range(self._config.workers)]
        self._workers.append(asyncio.create_task(self._heartbeat()))
        return self._epoch

    async def stop(self) -> None:
        """Become passive: stop fetching, let in-flight requests finish, release open pull requests, then NAK."""
        self._stopping.set()
        workers, self._workers = self._workers, []
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        await self._hand_back()
        log.info("signer %s passive (epoch was %s)", self._member, self._epoch)

    async def _hand_back(self, exclude: asyncio.Task[object] | None = None) -> None:
        """NAK what this member will not process, once none of its own pull requests is open any more.

        A NAKed message is redelivered at once to whichever pull request the server holds; if that were one of
        our workers that is shutting down, the message would sit in a dead inbox until ack_wait. So first every
        other worker unsubscribes, then the messages go back, to the member that is active now.
        """
        others = [w for w in self._workers if w is not exclude and not w.done()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        pending, self._to_hand_back = self._to_hand_back, []
        for msg in pending:
            await msg.nak()

    async def _worker(self, index: int) -> None:
        # One pull subscription per worker, each fetching one message at a time: a batch fetch in nats-py
        # lingers for the rest of the batch, which would add its whole timeout to latency at low load.
        psub = await self._js.pull_subscribe_bind(durable=subjects.SIGNING_CONSUMER, stream=subjects.SIGNING_STREAM)
        try:
            while not self._stopping.is_set():
                fetch = asyncio.ensure_future(psub.fetch(1, timeout=self._config.fetch_timeout_seconds))
                stop = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not fetch.done():
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                try:
                    msgs = fetch.result()
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    continue
                except Exception as exc:  # nats errors while the bus reconnects: keep polling
                    log.warning("worker %d fetch failed: %s", index, exc)
                    await asyncio.sleep(0.2)
                    continue
                for msg in msgs:
                    if self._stopping.is_set():
                        self._to_hand_back.append(msg)  # NAKed by stop() once our pull requests are closed
                    else:
                        await self.handle(msg)
        finally:
            # A cancelled fetch leaves its pull request open on the server, where it would capture the next
            # message until ack_wait (FIELD-NOTES): unsubscribing closes it.
            await psub.unsubscribe()

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._config.heartbeat_seconds)
            except asyncio.TimeoutError:
                for msg in list(self._inflight.values()):
                    await msg.in_progress()

    async def handle(self, msg: Msg) -> None:
        """Process one signing request message to an ack, a NAK (retry) or a term (never processable)."""
        parent = telemetry.extract(msg.headers)
        with tracer.start_as_current_span("cara.sign", context=parent, kind=trace.SpanKind.CONSUMER) as span:
            span.set_attribute("pki.member", self._member)
            if len(msg.data) > MAX_SIGNING_REQUEST_BYTES:
                await self._refuse_oversized(msg, span)
                return
            try:
                request = SignCertificate.model_validate_json(msg.data)
            except ValidationError as exc:
                log.error("malformed signing request terminated: %s", exc.errors(include_url=False, include_input=False)[:3])
                span.set_status(trace.StatusCode.ERROR, "malformed signing request")
                await msg.term()
                return
            span.set_attribute("pki.request_id", request.request_id)
            if request.request_id in self._inflight:
                return  # a redelivery of what this process is working on; the first copy acks
            self._inflight[request.request_id] = msg
            try:
                try:
                    await self._process(request, msg, span)
                except SigningRejected as exc:
                    # Recording a refusal can meet a fence or a database outage too: handled below (NAK, retry).
                    await self._reject(request, exc, msg)
            except FencedOut as exc:
                log.warning("fenced out at epoch %s: %s; stepping down", self._epoch, exc)
                span.set_status(trace.StatusCode.ERROR, "fenced out")
                self._to_hand_back.append(msg)
                self.fenced.set()
                self._stopping.set()
                # Hand the message back as soon as the other workers are gone (this one ends after returning).
                self._releasing = asyncio.create_task(self._hand_back(exclude=asyncio.current_task()))
            except HapkiError as exc:
                log.warning("request %s not processed (%s): %s; will retry", request.request_id, exc.code.value, exc)
                span.set_status(trace.StatusCode.ERROR, exc.code.value)
                await msg.nak(delay=self._config.retry_delay_seconds)
            except Exception:
                log.exception("bug while processing request %s; will retry", request.request_id)
                span.set_status(trace.StatusCode.ERROR, "internal error")
                await msg.nak(delay=self._config.retry_delay_seconds)
            finally:
                self._inflight.pop(request.request_id, None)

    async def _refuse_oversized(self, msg: Msg, span: trace.Span) -> None:
        """Terminate a signing request over MAX_SIGNING_REQUEST_BYTES unread; tell CLM if it names a request id.

        CLM cannot publish one (the stream's max_msg_size is the same cap), so this is a stream configured
        elsewhere or a forged message. The request id comes from the Nats-Msg-Id header (CLM sets it to the
        request id), never from the body, which is not parsed.
        """
        size, request_id = len(msg.data), (msg.headers or {}).get("Nats-Msg-Id", "")
        valid_id = _REQUEST_ID.fullmatch(request_id) is not None
        log.error("oversized signing request terminated unread: %d bytes, the limit is %d; request id %s",
                  size, MAX_SIGNING_REQUEST_BYTES, request_id if valid_id else "unknown")
        span.set_status(trace.StatusCode.ERROR, "oversized signing request")
        await msg.term()
        if valid_id:
            error = ErrorBody(code=ErrorCode.MESSAGE_TOO_LARGE,
                              message=f"signing request is {size} bytes; the limit is {MAX_SIGNING_REQUEST_BYTES}",
                              details={"size": size, "limit": MAX_SIGNING_REQUEST_BYTES})
            await self._publish(subjects.CARA_FAILED, SigningFailed(request_id=request_id, error=error))

    async def _process(self, request: SignCertificate, msg: Msg, span: trace.Span) -> None:
        epoch = self._epoch
        assert epoch is not None, "handle() before start()"
        # Step 0: only what CLM approved, whoever could publish on the bus (ApprovalInvalid otherwise).
        self._approvals.verify(request)
        # Step 1: redelivered after the result was stored? Answer from the database, never sign twice.
        outcome = await self._store.outcome(request.request_id)
        if outcome.issued is not None:
            span.set_attribute("pki.redelivered", True)
            await msg.ack()
            await self._publish_issued(outcome.issued)
            return
        if outcome.failed is not None:
            await msg.ack()
            await self._publish(subjects.CARA_FAILED, SigningFailed(request_id=request.request_id, error=outcome.failed))
            return
        csr = issuance.parse_csr(request)
        validation.recheck(request, self._profiles)  # PolicyViolation: not what this CA's profiles allow
        # Step 2: reserve serial + intent, fenced. A serial collision (UNIQUE) just draws again.
        intent_id = uuid.uuid4().hex
        serial = issuance.random_serial()
        now = self._clock()
        await self._store.reserve(
            intent_id=intent_id, request_id=request.request_id, issuer=self._issuer.name,
            serial=issuance.serial_hex(serial), epoch=epoch, member=self._member, now=now,
        )
        span.set_attribute("pki.serial", issuance.serial_hex(serial))
        # Step 3: sign through the HSM (in a thread: the PKCS#11 call blocks; contextvars carry the span).
        try:
            cert = await asyncio.to_thread(
                issuance.build_certificate, request, csr, issuer_cert=self._issuer_cert, issuer_key=self._key,
                serial=serial, now=now, backdate=timedelta(seconds=self._config.backdate_seconds),
                distribution=self._distribution,
            )
        except SigningRejected:
            await self._store.abandon_intent(intent_id, "rejected before signing", self._clock())
            raise
        except HapkiError:
            await self._store.abandon_intent(intent_id, "HSM failed; no signature made", self._clock())
            raise
        self.signatures += 1
        await self._faults.hit("cara.after_sign")
        # Step 4: store it, fenced. If another intent won the request meanwhile, theirs is returned.
        stored = await self._store.record_issued(
            IssuedRecord(
                request_id=request.request_id, issuer=self._issuer.name, serial=issuance.serial_hex(serial),
                intent_id=intent_id, cert_pem=cert.public_bytes(Encoding.PEM).decode(),
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
            ),
            epoch=epoch, now=self._clock(),
        )
        await self._faults.hit("cara.after_commit")
        # Step 5: ack, then tell CLM.
        await msg.ack()
        await self._publish_issued(stored)

    async def _reject(self, request: SignCertificate, exc: SigningRejected, msg: Msg) -> None:
        """Refuse for good: term the message (no redelivery), record the refusal, tell CLM if the request failed.

        Nothing was reserved or signed. SigningFailed goes out only when the store marked the request failed, i.e.
        the message was exactly what CLM recorded: a forged message must not wake (and fail) a waiting client.
        """
        error = ErrorBody(code=exc.code, message=exc.message, details=exc.details)
        marked = await self._store.refuse(request, error, epoch=self._epoch or 0, now=self._clock())
        await msg.term()
        if marked:
            log.warning("request %s refused by the CA (%s): %s", request.request_id, exc.code.value, exc)
            await self._publish(subjects.CARA_FAILED, SigningFailed(request_id=request.request_id, error=error))
        else:
            log.warning("signing request naming %s refused by the CA (%s) and audited; it is not what CLM recorded, "
                        "so no request changed state: %s", request.request_id, exc.code.value, exc)
        trace.get_current_span().set_status(trace.StatusCode.ERROR, exc.code.value)

    async def _publish_issued(self, record: IssuedRecord) -> None:
        await self._publish(
            subjects.CARA_ISSUED,
            CertificateIssued(
                request_id=record.request_id, serial=record.serial, issuer=record.issuer,
                certificate_pem=record.cert_pem, chain_pem=self._issuer.chain_pem,
                not_before=record.not_before, not_after=record.not_after,
            ),
        )

    async def _publish(self, subject: str, event: CertificateIssued | SigningFailed) -> None:
        await self._nc.publish(subject, event.model_dump_json().encode(), headers=telemetry.inject())
