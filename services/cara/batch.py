"""The five steps of signing, for a batch of parsed signing requests (hapki.cara.signer fetches and admits them).

Step 0: every request must carry a valid CLM approval (hapki.runtime.approval); else it is refused before anything
        is read, reserved or signed.
Step 1: each CSR is parsed again and the CA's own profile check runs (hapki.runtime.validation.recheck): the
        content must be exactly what this CA's profiles give that CSR. A refusal reserves and signs nothing.
Step 2: reserve a random serial and write a signing intent for each, fenced by the epoch, in one transaction. The
        usual batch does it in one round trip whose fence also checks that none of its requests has anything
        stored (SigningStore.reserve_fresh). Otherwise (a redelivery, a refusal in step 1) the final outcomes
        already stored are read first, for the batch: those are republished without signing again, refusals are
        settled, and the rest is reserved (reserve_batch, superseding older intents).
Step 3: build the certificates and sign them through the HSM (one thread hop for the batch).
Step 4: store the certificates and mark the requests issued, fenced again, in one transaction.
Step 5: ack each message, then publish the results.
A refusal or a failure of one request (its HSM signature, say) settles that request alone. FencedOut and other
HapkiErrors leave the caller to settle what is not settled yet (hand back, or NAK with a delay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import trace

from hapki.cara import issuance
from hapki.cara.config import SignerConfig
from hapki.cara.ports import Intent, IssuedRecord, IssuerRecord, SigningStore
from hapki.contracts import subjects
from hapki.contracts.errors import DuplicateKey, HapkiError, SigningRejected
from hapki.contracts.models import CertificateIssued, ErrorBody, SignCertificate, SigningFailed
from hapki.runtime import telemetry, validation
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.faults import FailPoints
from hapki.runtime.ids import time_ordered_id
from hapki.runtime.profiles import Profile

log = logging.getLogger("hapki.cara.signer")
# A serial collision (UNIQUE key) in a batch reservation draws new serials for the batch, at most this often.
RESERVE_ATTEMPTS = 4


@dataclass(frozen=True)
class SigningIdentity:
    """The issuing CA a batch signs as: its record, HSM key, certificate and the URLs its certificates carry. One
    object, swapped whole (`BatchSteps.use`): a batch takes it once, so its intents, signatures and stored rows all
    name the same issuer even when a rollover switches the signer in the middle of it."""

    issuer: IssuerRecord
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    distribution: issuance.Distribution | None  # CDP and AIA OCSP URLs put in every certificate, if any

    @classmethod
    def of(cls, issuer: IssuerRecord, key: ec.EllipticCurvePrivateKey,
           distribution: issuance.Distribution | None) -> SigningIdentity:
        return cls(issuer, key, issuer.certificate, distribution)


@dataclass(eq=False)
class Item:
    """One signing request of a batch, from its message to its settlement (ack, NAK or term)."""

    msg: Msg
    request: SignCertificate
    span: trace.Span  # `cara.sign`, a child of the trace the message carried
    csr: x509.CertificateSigningRequest | None = None
    intent_id: str = ""
    serial: int = 0
    cert: x509.Certificate | None = None
    settled: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def ack(self) -> None:
        self.settled = True
        await self.msg.ack()

    async def term(self) -> None:
        self.settled = True
        await self.msg.term()

    async def nak(self, delay: float | None = None) -> None:
        self.settled = True
        await self.msg.nak(delay=delay)


class BatchSteps:
    """Steps 0-5 for one batch at a time (several batches may run at once); counts the HSM signatures made."""

    def __init__(
        self,
        *,
        nc: Client,
        store: SigningStore,
        issuer: IssuerRecord,
        issuer_key: ec.EllipticCurvePrivateKey,
        member: str,
        config: SignerConfig,
        clock: Callable[[], datetime],
        approvals: ApprovalVerifier,
        profiles: Mapping[str, Profile],
        faults: FailPoints,
        distribution: issuance.Distribution | None,
        serials: Callable[[], int],
    ) -> None:
        self._nc, self._store = nc, store
        self._approvals, self._profiles = approvals, profiles
        self._identity = SigningIdentity.of(issuer, issuer_key, distribution)
        self._chains = {issuer.name: issuer.chain_pem}  # by issuer name: a redelivery after a rollover gets its own
        self._member, self._config, self._clock = member, config, clock
        self._serials = serials  # the CSPRNG draw (tests inject collisions)
        self._faults = faults
        self.signatures = 0  # HSM signatures made (for tests and metrics)

    @property
    def identity(self) -> SigningIdentity:
        return self._identity

    def use(self, identity: SigningIdentity) -> None:
        """Sign every batch that starts from now on as `identity` (a rollover); batches under way finish as before."""
        self._chains[identity.issuer.name] = identity.issuer.chain_pem
        self._identity = identity

    async def run(self, items: list[Item], epoch: int) -> None:
        """Take every item as far as it goes: settled (acked, termed, NAKed) unless an exception leaves the rest."""
        identity = self._identity  # the whole batch signs as one issuer
        # Step 0: only what CLM approved, whoever could publish on the bus (ApprovalInvalid otherwise).
        approved: list[Item] = []
        for item in items:
            try:
                self._approvals.verify(item.request)
            except SigningRejected as exc:
                await self._reject(item, exc, epoch)
                continue
            approved.append(item)
        # Step 1: each CSR parsed again and held against this CA's profiles. A refusal is settled only below, once
        # it is known that the request has no result stored already (a redelivery is answered, not refused).
        refusals: dict[Item, SigningRejected] = {}
        for item in approved:
            try:
                item.csr = issuance.parse_csr(item.request)  # parsed and its signature verified once
                # PolicyViolation: not what our profiles allow for this CSR.
                validation.recheck(item.request, self._profiles, verified_csr=item.csr)
            except SigningRejected as exc:
                refusals[item] = exc
        if not approved:
            return
        # Step 2: reserve serials + intents for the batch, fenced. The usual batch (nothing stored yet for any of
        # its requests, nothing refused) takes one round trip whose fence checks that; otherwise, or when that
        # check fails, the outcomes are read first and only what is left is reserved.
        now = self._clock()
        todo: list[Item] | None = None
        if not refusals and await self._reserve(approved, identity, epoch, now, fresh=True):
            todo = approved
        if todo is None:
            todo = await self._settle_stored(approved, refusals, epoch)
            if not todo:
                return
            await self._reserve(todo, identity, epoch, now, fresh=False)
        # Step 3: sign through the HSM, in one thread for the batch (PKCS#11 calls block; the loop stays free).
        failures = await asyncio.to_thread(self._sign_all, todo, identity, now)
        signed = [item for item in todo if item.cert is not None]
        self.signatures += len(signed)
        for item, exc in failures:
            await self._failed_signing(item, exc, epoch)
        if not signed:
            return
        await self._faults.hit("cara.after_sign")
        # Step 4: store them, fenced. Where another intent won a request meanwhile, theirs is returned.
        stored = await self._store.record_issued_batch([self._record(item, identity) for item in signed], epoch=epoch,
                                                       now=self._clock())
        await self._faults.hit("cara.after_commit")
        # Step 5: ack each (only now: everything is committed), then tell CLM.
        for item, record in zip(signed, stored):
            if record is None:
                # A newer attempt for this request superseded our intent; this signature is never stored.
                log.warning("request %s: intent %s was superseded before its certificate was stored",
                            item.request_id, item.intent_id)
                await item.nak()
            else:
                await item.ack()
        for item, record in zip(signed, stored):
            if record is not None:
                await self._publish_issued(record, item.span)

    async def _settle_stored(self, items: list[Item], refusals: Mapping[Item, SigningRejected],
                             epoch: int) -> list[Item]:
        """Redelivered after the result was stored? Answer from the database, never sign twice; refuse what step 1
        refused; the rest, to be reserved."""
        outcomes = await self._store.outcomes([item.request_id for item in items])
        todo: list[Item] = []
        for item in items:
            outcome = outcomes.get(item.request_id)
            if outcome is None:
                refusal = refusals.get(item)
                if refusal is None:
                    todo.append(item)
                else:
                    await self._reject(item, refusal, epoch)
            elif outcome.issued is not None:
                item.span.set_attribute("pki.redelivered", True)
                await item.ack()
                await self._publish_issued(outcome.issued, item.span)
            elif outcome.failed is not None:
                await item.ack()
                with trace.use_span(item.span, end_on_exit=False):
                    await self.publish(subjects.CARA_FAILED,
                                        SigningFailed(request_id=item.request_id, error=outcome.failed))
        return todo

    async def _reserve(self, items: list[Item], identity: SigningIdentity, epoch: int, now: datetime, *,
                       fresh: bool) -> bool:
        """Draw serials and reserve them with their intents; `fresh`: only if nothing is stored for any request
        (False if something is: nothing reserved), else superseding older intents (always True)."""
        for attempt in range(1, RESERVE_ATTEMPTS + 1):
            for item in items:
                item.intent_id, item.serial = time_ordered_id(), self._serials()
                item.span.set_attribute("pki.serial", issuance.serial_hex(item.serial))
            intents = [Intent(intent_id=item.intent_id, request_id=item.request_id, issuer=identity.issuer.name,
                              serial=issuance.serial_hex(item.serial)) for item in items]
            try:
                if fresh:
                    return await self._store.reserve_fresh(intents, epoch=epoch, member=self._member, now=now)
                await self._store.reserve_batch(intents, epoch=epoch, member=self._member, now=now)
                return True
            except DuplicateKey:
                if attempt == RESERVE_ATTEMPTS:
                    raise
                log.warning("serial collision reserving a batch of %d; drawing again", len(items))
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _sign_all(self, items: list[Item], identity: SigningIdentity, now: datetime) -> list[tuple[Item, Exception]]:
        """Build and sign each certificate (in a worker thread); the failures, each with its item."""
        failures: list[tuple[Item, Exception]] = []
        for item in items:
            assert item.csr is not None
            with trace.use_span(item.span, end_on_exit=False):
                try:
                    item.cert = issuance.build_certificate(
                        item.request, item.csr, issuer_cert=identity.cert, issuer_key=identity.key,
                        serial=item.serial, now=now, backdate=timedelta(seconds=self._config.backdate_seconds),
                        distribution=identity.distribution,
                    )
                except Exception as exc:  # settled one by one on the loop (_failed_signing); the others go on
                    failures.append((item, exc))
        return failures

    async def _failed_signing(self, item: Item, exc: Exception, epoch: int) -> None:
        """Abandon the intent of a request whose certificate was not made (audited), then refuse or retry it."""
        if isinstance(exc, SigningRejected):
            await self._store.abandon_intent(item.intent_id, "rejected before signing", self._clock())
            await self._reject(item, exc, epoch)
            return
        if isinstance(exc, HapkiError):
            reason, status = "HSM failed; no signature made", exc.code.value
            log.warning("request %s not signed (%s): %s; will retry", item.request_id, status, exc)
        else:
            reason, status = f"internal error while signing: {type(exc).__name__}", "internal error"
            log.error("bug while signing request %s; will retry", item.request_id, exc_info=exc)
        await self._store.abandon_intent(item.intent_id, reason, self._clock())
        item.span.set_status(trace.StatusCode.ERROR, status)
        await item.nak(delay=self._config.retry_delay_seconds)

    def _record(self, item: Item, identity: SigningIdentity) -> IssuedRecord:
        assert item.cert is not None
        return IssuedRecord(
            request_id=item.request_id, issuer=identity.issuer.name, serial=issuance.serial_hex(item.serial),
            intent_id=item.intent_id, cert_pem=item.cert.public_bytes(Encoding.PEM).decode(),
            not_before=item.cert.not_valid_before_utc, not_after=item.cert.not_valid_after_utc,
        )

    async def _reject(self, item: Item, exc: SigningRejected, epoch: int) -> None:
        """Refuse for good: term the message (no redelivery), record the refusal, tell CLM if the request failed.

        Nothing was reserved or signed. SigningFailed goes out only when the store marked the request failed, i.e.
        the message was exactly what CLM recorded: a forged message must not wake (and fail) a waiting client.
        """
        request = item.request
        error = ErrorBody(code=exc.code, message=exc.message, details=exc.details)
        # Recording a refusal can meet a fence or a database outage too: the batch hands it back (NAK, retry).
        marked = await self._store.refuse(request, error, epoch=epoch, now=self._clock())
        await item.term()
        item.span.set_status(trace.StatusCode.ERROR, exc.code.value)
        if marked:
            log.warning("request %s refused by the CA (%s): %s", request.request_id, exc.code.value, exc)
            with trace.use_span(item.span, end_on_exit=False):
                await self.publish(subjects.CARA_FAILED, SigningFailed(request_id=request.request_id, error=error))
        else:
            log.warning("signing request naming %s refused by the CA (%s) and audited; it is not what CLM recorded, "
                        "so no request changed state: %s", request.request_id, exc.code.value, exc)

    async def _chain(self, issuer: str) -> str:
        """The chain of the issuer a stored certificate names (an older one's for a redelivery after a rollover)."""
        chain = self._chains.get(issuer)
        if chain is None:
            chain = self._chains[issuer] = (await self._store.load_issuer(issuer)).chain_pem
        return chain

    async def _publish_issued(self, record: IssuedRecord, span: trace.Span) -> None:
        chain_pem = await self._chain(record.issuer)
        with trace.use_span(span, end_on_exit=False):
            await self.publish(
                subjects.CARA_ISSUED,
                CertificateIssued(
                    request_id=record.request_id, serial=record.serial, issuer=record.issuer,
                    certificate_pem=record.cert_pem, chain_pem=chain_pem,
                    not_before=record.not_before, not_after=record.not_after,
                ),
            )

    async def publish(self, subject: str, event: CertificateIssued | SigningFailed) -> None:
        await self._nc.publish(subject, event.model_dump_json().encode(), headers=telemetry.inject())
