"""The CARA signer: consumes signing requests from JetStream in batches and issues certificates through the HSM.

Active only between start() and stop() (the HA supervisor calls them on VIP changes). One pull request at a time
fetches up to `batch` messages: it waits for the first one and returns with whatever else is ready, so a batch
never waits to fill (at low load it holds one message). Up to `batches_in_flight` batches are worked on at once;
while they are, messages queue in the stream, so the next fetch takes them together. Each message is admitted
(size cap, parse, not already in flight here), then the batch goes through the five steps of hapki.cara.batch.
Being fenced hands every unsettled message of the batch back (NAK) and steps down; a database outage NAKs them
with a delay.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import nats.errors
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from pydantic import ValidationError

from hapki.cara import issuance
from hapki.cara.batch import BatchSteps, Item, SigningIdentity
from hapki.cara.config import SignerConfig
from hapki.cara.ports import IssuerRecord, SigningStore
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode, FencedOut, HapkiError
from hapki.contracts.limits import MAX_SIGNING_REQUEST_BYTES
from hapki.contracts.models import ErrorBody, SignCertificate, SigningFailed
from hapki.runtime import telemetry
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.faults import FailPoints
from hapki.runtime.profiles import Profile

log = logging.getLogger("hapki.cara.signer")
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
tracer = trace.get_tracer("hapki.cara")


class InFlight:
    """The messages this process is working on, by request id, with when the server last heard of each (its
    admission here, or our last in_progress())."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, tuple[Msg, float]] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def add(self, request_id: str, msg: Msg) -> None:
        self._held[request_id] = (msg, self._clock())

    def discard(self, request_id: str, msg: Msg) -> None:
        """Forget ``msg`` (not a newer copy of its request that replaced it)."""
        held = self._held.get(request_id)
        if held is not None and held[0] is msg:
            del self._held[request_id]

    def due(self, interval: float) -> list[Msg]:
        """The messages the server has not heard of for ``interval`` seconds or more, marked as heard of now.

        Called every ``interval``: a message settled within its first interval gets no in_progress() (before, every
        message in flight got one on every tick), and one held longer is heard of at least every 2 intervals, well
        inside ack_wait."""
        now = self._clock()
        due = [(request_id, msg) for request_id, (msg, told) in self._held.items() if now - told >= interval]
        for request_id, msg in due:
            self._held[request_id] = (msg, now)
        return [msg for _, msg in due]


def undelivered(psub: JetStreamContext.PullSubscription) -> list[Msg]:
    """Messages the server delivered to ``psub`` that no fetch() took, taken out of its queue (status messages,
    answers to earlier pull requests, are dropped as fetch() drops them). nats-py keeps them in the subscription's
    pending queue, where its next fetch() would look first; it has no public call to take them without a fetch."""
    queue = psub._sub._pending_queue  # noqa: SLF001 - see the docstring
    msgs = []
    while not queue.empty():
        msg = queue.get_nowait()
        if not JetStreamContext.is_status_msg(msg):
            msgs.append(msg)
    return msgs


class Signer:
    """The batched pull loop over the signing consumer, fenced by the CARA epoch."""

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
        serials: Callable[[], int] = issuance.random_serial,
    ) -> None:
        self._nc, self._js, self._store = nc, js, store
        self._member, self._config, self._clock = member, config, clock
        self._steps = BatchSteps(
            nc=nc, store=store, issuer=issuer, issuer_key=issuer_key, member=member, config=config, clock=clock,
            approvals=approvals, profiles=profiles, faults=faults or FailPoints(""), distribution=distribution,
            serials=serials)
        self._epoch: int | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # the fetch loop, the batches, in_progress() reports
        self._inflight = InFlight()
        self._beat: asyncio.TimerHandle | None = None  # the next heartbeat, armed only while messages are held
        self._to_hand_back: list[Msg] = []  # fetched but not to be processed here: NAKed on the way out
        self._releasing: asyncio.Task[None] | None = None  # the hand-back after being fenced (kept referenced)
        self.fenced = asyncio.Event()  # set when a newer epoch fenced us out: the supervisor must step down
        self.batches: list[int] = []  # sizes of the last batches fetched (for tests and metrics), newest last

    @property
    def signatures(self) -> int:
        """HSM signatures made by this signer (for tests and metrics)."""
        return self._steps.signatures

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def issuer(self) -> IssuerRecord:
        """The issuing CA this signer signs for (name, certificate, chain)."""
        return self._steps.identity.issuer

    @property
    def identity(self) -> SigningIdentity:
        """The issuing CA this signer signs as from its next batch (record, key, parsed certificate, URLs)."""
        return self._steps.identity

    @property
    def issuer_key(self) -> ec.EllipticCurvePrivateKey:
        """The issuing CA's private key object (in the HSM; sign-only)."""
        return self._steps.identity.key

    def use_issuer(self, issuer: IssuerRecord, issuer_key: ec.EllipticCurvePrivateKey,
                   distribution: issuance.Distribution | None) -> None:
        """Sign as `issuer` from the next batch on (a rollover, `hapki ca rollover`); batches under way finish as the
        issuer they started with, so an intent, its signature and its stored certificate always name one issuer."""
        before = self._steps.identity.issuer.name
        self._steps.use(SigningIdentity.of(issuer, issuer_key, distribution))
        log.info("signer %s issues as %s from now on (was %s)", self._member, issuer.name, before)

    @property
    def active(self) -> bool:
        return bool(self._tasks) and not self._stopping.is_set()

    async def start(self) -> int:
        """Become active: bump the epoch (compare-and-set), resolve stale intents, start pulling."""
        if self.active:
            return self._epoch or 0
        if self._tasks:
            await self.stop()  # fenced earlier: reap the old tasks before new ones exist
        self._stopping.clear()
        self.fenced.clear()
        now = self._clock()
        epoch = await self._store.bump_epoch(self._member, now)
        # Only intents of older epochs: the member's other signer processes work under this one (join()).
        abandoned = await self._store.abandon_stale_intents(epoch, now)
        log.info("signer %s active at epoch %d; %d stale intents abandoned", self._member, epoch, abandoned)
        self._pull(epoch)
        return epoch

    async def join(self, epoch: int) -> None:
        """Become active under `epoch`, which this member's main signer obtained (a signer worker process).

        No bump (it would fence the main signer out) and no recovery (the main signer did it when it bumped):
        start pulling and sign fenced by that epoch, which fails, and steps this signer down, once another
        start() anywhere moved the epoch on.
        """
        if self.active and self._epoch == epoch:
            return
        if self._tasks:
            await self.stop()  # active under another epoch, or fenced earlier: reap the old tasks first
        log.info("signer %s joins epoch %d", self._member, epoch)
        self._pull(epoch)

    def _pull(self, epoch: int) -> None:
        self._stopping.clear()
        self.fenced.clear()
        self._epoch = epoch
        self._spawn(self._fetch_loop())

    async def stop(self) -> None:
        """Become passive: stop fetching, let batches in progress finish, release the pull request, then NAK."""
        self._stopping.set()
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._hand_back()
        log.info("signer %s passive (epoch was %s)", self._member, self._epoch)

    def _spawn(self, work: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _hand_back(self, exclude: asyncio.Task[object] | None = None) -> None:
        """NAK what this member will not process, once its pull request is closed and its batches are done.

        A NAKed message is redelivered at once to whichever pull request the server holds; if that were ours while
        shutting down, the message would sit in a dead inbox until ack_wait. So first the fetch loop unsubscribes
        and the other batches finish, then the messages go back, to the member that is active now.
        """
        while others := [t for t in self._tasks if t is not exclude and not t.done()]:
            await asyncio.gather(*others, return_exceptions=True)
        pending, self._to_hand_back = self._to_hand_back, []
        for msg in pending:
            await msg.nak()

    async def _fetch_loop(self) -> None:
        # One pull request open at a time: nats-py's fetch(n) waits for the first message and returns with what
        # is ready then (the server ends a no_wait pull as soon as it delivered some), so a batch never waits to
        # fill. A second open pull request of ours could make the server answer "408 Requests Pending", after which
        # nats-py falls back to a pull that does wait for the whole batch.
        psub = await self._js.pull_subscribe_bind(durable=subjects.SIGNING_CONSUMER, stream=subjects.SIGNING_STREAM)
        slots = asyncio.Semaphore(self._config.batches_in_flight)
        try:
            while not self._stopping.is_set():
                await slots.acquire()  # a batch slot first: while all are busy, messages wait in the stream
                if self._stopping.is_set():
                    slots.release()
                    break
                fetch = asyncio.ensure_future(psub.fetch(self._config.batch, timeout=self._config.fetch_timeout_seconds))
                stop = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not fetch.done():
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    slots.release()
                    break
                try:
                    msgs = fetch.result()
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    slots.release()
                    continue
                except Exception as exc:  # nats errors while the bus reconnects: keep polling
                    log.warning("fetch failed: %s", exc)
                    slots.release()
                    await asyncio.sleep(0.2)
                    continue
                if self._stopping.is_set():
                    self._to_hand_back.extend(msgs)  # NAKed by stop() once our pull request is closed
                    slots.release()
                    break
                self.batches = [*self.batches[-99:], len(msgs)]
                self._spawn(self._batch(msgs)).add_done_callback(lambda _: slots.release())
        finally:
            # What the server delivered to our pull request after the last fetch took its messages (a cancelled
            # fetch: stopping) waits in the subscription's queue; the unsubscribe would drop it and the server
            # would redeliver it only after ack_wait. It goes back with the rest (NAK: to the active member now).
            self._to_hand_back.extend(undelivered(psub))
            # A cancelled fetch leaves its pull request open on the server, where it would capture the next
            # message until ack_wait (FIELD-NOTES): unsubscribing closes it.
            await psub.unsubscribe()

    def _beat_later(self) -> None:
        """Arm the heartbeat: in heartbeat_seconds, in_progress() for the messages held that long. Armed when a
        message is admitted and again by each beat while any is held, so an idle signer is not woken for it."""
        if self._beat is None and not self._stopping.is_set():
            self._beat = asyncio.get_running_loop().call_later(self._config.heartbeat_seconds, self._beat_now)

    def _beat_now(self) -> None:
        self._beat = None
        if self._stopping.is_set():
            return
        due = self._inflight.due(self._config.heartbeat_seconds)
        if due:
            self._spawn(self._in_progress(due))
        if len(self._inflight):
            self._beat_later()

    async def _in_progress(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            try:
                await msg.in_progress()
            except nats.errors.Error as exc:
                # The bus connection is closing or gone: the message comes back after ack_wait, to whichever
                # signer is active then, and is answered from the database (no second signature).
                log.warning("in_progress() for a held signing request failed: %s", exc)
                return

    async def handle(self, msg: Msg) -> None:
        """Process one signing request message to an ack, a NAK (retry) or a term (never processable)."""
        await self.handle_batch([msg])

    async def handle_batch(self, msgs: Sequence[Msg]) -> None:
        """Process fetched signing request messages, each to an ack, a NAK (retry) or a term (never processable)."""
        await self._batch(msgs)

    async def _batch(self, msgs: Sequence[Msg]) -> None:
        items = [item for msg in msgs if (item := await self._admit(msg)) is not None]
        if not items:
            return
        # The batch's transactions run under the trace of its first sampled request, linked to every sampled
        # request's span (a sampler that keeps 1% of the traces still sees the database work of the ones it kept);
        # with none sampled, under the first request's trace, and nothing is recorded.
        recorded = [item.span for item in items if item.span.is_recording()]
        links = [trace.Link(span.get_span_context()) for span in recorded]
        try:
            with tracer.start_as_current_span("cara.batch", context=trace.set_span_in_context(
                    recorded[0] if recorded else items[0].span), links=links) as span:
                span.set_attribute("pki.batch_size", len(items))
                span.set_attribute("pki.member", self._member)
                try:
                    assert self._epoch is not None, "handle() before start()"
                    await self._steps.run(items, self._epoch)
                except FencedOut as exc:
                    log.warning("fenced out at epoch %s: %s; stepping down", self._epoch, exc)
                    self._mark_unsettled(items, "fenced out")
                    self._to_hand_back.extend(item.msg for item in items if not item.settled)
                    self.fenced.set()
                    self._stopping.set()
                    # Hand the messages back as soon as the other batches are gone (this one ends after returning).
                    current = asyncio.current_task()
                    self._releasing = asyncio.create_task(self._hand_back(exclude=current))
                except HapkiError as exc:
                    log.warning("batch of %d not processed (%s): %s; will retry", len(items), exc.code.value, exc)
                    await self._nak_all(items, exc.code.value)
                except Exception:
                    log.exception("bug while processing a batch of %d; will retry", len(items))
                    await self._nak_all(items, "internal error")
        finally:
            for item in items:
                item.span.end()
                self._inflight.discard(item.request_id, item.msg)

    def _mark_unsettled(self, items: Sequence[Item], status: str) -> None:
        """Mark the spans of the items not settled yet with an error status."""
        for item in items:
            if not item.settled:
                item.span.set_status(trace.StatusCode.ERROR, status)

    async def _nak_all(self, items: Sequence[Item], status: str) -> None:
        self._mark_unsettled(items, status)
        for item in items:
            if not item.settled:
                await item.nak(delay=self._config.retry_delay_seconds)

    async def _admit(self, msg: Msg) -> Item | None:
        """Open the request's span and parse it; None when it is settled here already (or a duplicate in flight)."""
        span = tracer.start_span("cara.sign", context=telemetry.extract(msg.headers), kind=trace.SpanKind.CONSUMER)
        span.set_attribute("pki.member", self._member)
        with trace.use_span(span, end_on_exit=False):
            if len(msg.data) > MAX_SIGNING_REQUEST_BYTES:
                await self._refuse_oversized(msg, span)
                span.end()
                return None
            try:
                request = SignCertificate.model_validate_json(msg.data)
            except ValidationError as exc:
                log.error("malformed signing request terminated: %s",
                          exc.errors(include_url=False, include_input=False)[:3])
                span.set_status(trace.StatusCode.ERROR, "malformed signing request")
                await msg.term()
                span.end()
                return None
        span.set_attribute("pki.request_id", request.request_id)
        if request.request_id in self._inflight:
            span.end()
            return None  # a redelivery of what this process is working on; the first copy acks
        self._inflight.add(request.request_id, msg)
        self._beat_later()
        return Item(msg=msg, request=request, span=span)

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
            await self._steps.publish(subjects.CARA_FAILED, SigningFailed(request_id=request_id, error=error))
