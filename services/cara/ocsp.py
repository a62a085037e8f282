"""The OCSP responder (RFC 6960): request DER in, signed response DER out, status from the database.

Responses are signed by the issuer's delegated OCSP signer (EKU id-kp-OCSPSigning, id-pkix-ocsp-nocheck, key in
the HSM), which every member loads, so the passive member answers too. Never an exception to the HTTP edge:
- not a parseable single-certificate request -> malformedRequest;
- a request about another issuer -> unauthorized (RFC 6960 2.3: not authoritative);
- the database (or HSM) unavailable -> tryLater; anything else -> internalError (logged).
A serial this CA never issued is `unknown` (BR 4.9.10: never `good`). thisUpdate is when the response was
produced, nextUpdate that + `validity_seconds`.

Responses without a nonce come from the member's OcspCache (hapki.cara.ocsp_cache): produced once per certificate
and CertID hash, reused, produced again when old or when the certificate is revoked. A request with a nonce
(RFC 8954) gets a response signed for it with the nonce echoed, from a fresh database read, never cached, unless
`echo_nonce` is off: then the nonce is ignored (RFC 5019 2.1.1) and the cached response is served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from opentelemetry import trace

from hapki.cara.ocsp_cache import OcspCache, Signed
from hapki.cara.ports import IssuerRecord, SerialStatus
from hapki.contracts.errors import HapkiError, MalformedMessage
from hapki.contracts.limits import MAX_OCSP_REQUEST_BYTES
from hapki.runtime import metrics

log = logging.getLogger("hapki.cara.ocsp")
tracer = trace.get_tracer("hapki.cara")
_RESPONSES = metrics.counter("hapki.ocsp.responses")
_SECONDS = metrics.histogram("hapki.ocsp.duration")

# Largest request read: one constant for every edge (POST body, decoded GET path), in hapki.contracts.limits.
MAX_REQUEST_BYTES = MAX_OCSP_REQUEST_BYTES
MAX_NONCE_BYTES = 32
_HASHES: tuple[type[hashes.HashAlgorithm], ...] = (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)


class StatusStore(Protocol):
    async def serial_status(self, issuer: str, serial: str) -> SerialStatus: ...


def record(status: str, seconds: float) -> None:
    """Count and time one OCSP answer: good, revoked, unknown, or the name of the error status."""
    _RESPONSES.add(1, {"ocsp.status": status})
    _SECONDS.record(seconds, {"ocsp.status": status})


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned error response (malformedRequest, unauthorized, tryLater, internalError)."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


class OcspResponder:
    """Answers OCSP requests about one issuer (OcspRouter: about each issuer a member serves)."""

    def __init__(
        self,
        *,
        store: StatusStore,
        issuer: IssuerRecord,
        signer_cert: x509.Certificate,
        signer_key: ec.EllipticCurvePrivateKey,
        validity_seconds: int,
        clock: Callable[[], datetime],
        cache: OcspCache | None = None,
        echo_nonce: bool = True,
    ) -> None:
        self._store, self._issuer = store, issuer
        self._cache, self._echo_nonce = cache, echo_nonce
        self._signer = (signer_cert, signer_key)  # one attribute: a swap is atomic for the signing threads
        self._ca_revoked: tuple[datetime, str] | None = None  # (when, leaf reason): the root revoked the issuer
        self._validity = timedelta(seconds=validity_seconds)
        self._clock = clock
        issuer_cert = issuer.certificate
        name = issuer_cert.subject.public_bytes()
        key = issuer_cert.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        # (name hash, key hash) of the issuer under each hash a client may use in its CertID.
        self._issuer_hashes = {algorithm.name: (_digest(algorithm(), name), _digest(algorithm(), key))
                               for algorithm in _HASHES}

    @property
    def issuer(self) -> str:
        return self._issuer.name

    @property
    def signer_certificate(self) -> x509.Certificate:
        """The responder certificate this responder signs with now."""
        return self._signer[0]

    def ca_revoked(self, revoked_at: datetime, reason: str) -> None:
        """Its root revoked this responder's issuing CA: every certificate it issued is answered `revoked` from now
        on (at the CA's revocation time, reason cACompromise when its key was compromised, else the CA's own
        reason), unless revoked earlier on its own. Cached answers are dropped."""
        if self._ca_revoked is not None:
            return
        leaf_reason = "ca_compromise" if reason in ("key_compromise", "ca_compromise") else reason
        self._ca_revoked = (revoked_at, leaf_reason)
        if self._cache is not None:
            self._cache.clear()

    def use_signer(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        """Sign from now on with this responder certificate and key (a renewal: hapki.cara.ocsp_signer). Responses
        signed and cached before stay valid (they carry the old certificate, which renewal leaves weeks to run)."""
        self._signer = (cert, key)

    async def respond(self, der: bytes) -> OcspAnswer:
        """The answer to a DER request about this responder's issuer (else unauthorized); never raises."""
        return await answer(der, lambda question: self)

    def _cacheable(self, question: OcspQuestion) -> bool:
        return self._cache is not None and (question.nonce is None or not self._echo_nonce)

    def _cached(self, question: OcspQuestion) -> Signed | None:
        """The cached response to an authoritative, cacheable question (a refresh of an old one is started)."""
        if self._cache is None or not self._cacheable(question) or not self.authoritative(question):
            return None
        serial, algorithm = format(question.serial, "x"), question.algorithm.name
        signed = self._cache.lookup(serial, algorithm)
        if signed is not None and self._cache.needs_refresh(serial, algorithm):
            self._cache.refresh(serial, algorithm, self._producer(question))
        return signed

    async def _answer(self, question: OcspQuestion) -> OcspAnswer:
        """Produce the answer (through the cache when it may be kept); errors become unsigned error statuses."""
        if not self.authoritative(question):
            return _error(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        try:
            if self._cache is not None and self._cacheable(question):
                signed, hit = await self._cache.get(format(question.serial, "x"), question.algorithm.name,
                                                    self._producer(question))
                return OcspAnswer(signed.status, signed.der, signed, "cache" if hit else "produced")
            signed = await self._producer(question)()
            return OcspAnswer(signed.status, signed.der, None, "nonce" if question.nonce else "produced")
        except HapkiError as exc:
            log.warning("OCSP answered tryLater: %s", exc)
            return _error(ocsp.OCSPResponseStatus.TRY_LATER)
        except Exception:
            log.exception("bug while answering an OCSP request")
            return _error(ocsp.OCSPResponseStatus.INTERNAL_ERROR)

    def _producer(self, question: OcspQuestion) -> Callable[[], Awaitable[Signed]]:
        """Read the status and sign: with the request's nonce when it is echoed, else without (cacheable)."""
        if not (question.nonce is not None and self._echo_nonce):
            question = question._replace(nonce=None)

        async def produce() -> Signed:
            status = await self._store.serial_status(self._issuer.name, format(question.serial, "x"))
            revoked = self._ca_revoked
            if revoked is not None and status.known and status.revoked_at is None:
                status = SerialStatus(known=True, revoked_at=revoked[0], reason=revoked[1])
            return await asyncio.to_thread(self.sign, question, status)

        return produce

    def authoritative(self, question: OcspQuestion) -> bool:
        """Whether the request's CertID names this responder's issuer (RFC 6960 2.3: else `unauthorized`)."""
        hashes_of_issuer = self._issuer_hashes.get(question.algorithm.name)
        return hashes_of_issuer == (question.issuer_name_hash, question.issuer_key_hash)

    def sign(self, question: OcspQuestion, status: SerialStatus) -> Signed:
        """The signed response to an authoritative question, for this status (blocking: the key is in the HSM)."""
        this_update = self._clock().replace(microsecond=0)
        der = self.sign_response(question, status, this_update)
        name = "unknown" if not status.known else "revoked" if status.revoked_at else "good"
        return Signed(der=der, status=name, this_update=this_update, next_update=this_update + self._validity)

    def sign_response(self, question: OcspQuestion, status: SerialStatus, this_update: datetime | None = None) -> bytes:
        """The signed DER response to an authoritative question, for this status (blocking: the key is in the HSM)."""
        algorithm, name_hash, key_hash = question.algorithm, question.issuer_name_hash, question.issuer_key_hash
        serial, nonce = question.serial, question.nonce
        signer_cert, signer_key = self._signer
        this_update = this_update or self._clock().replace(microsecond=0)
        revoked_at = reason = None
        if not status.known:
            cert_status = ocsp.OCSPCertStatus.UNKNOWN
        elif status.revoked_at is not None:
            cert_status = ocsp.OCSPCertStatus.REVOKED
            revoked_at = status.revoked_at.replace(microsecond=0)
            if status.reason and status.reason != x509.ReasonFlags.unspecified.name:
                reason = x509.ReasonFlags[status.reason]
        else:
            cert_status = ocsp.OCSPCertStatus.GOOD
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=name_hash, issuer_key_hash=key_hash, serial_number=serial, algorithm=algorithm,
                cert_status=cert_status, this_update=this_update, next_update=this_update + self._validity,
                revocation_time=revoked_at, revocation_reason=reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
            .certificates([signer_cert])
        )
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        return builder.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


async def answer(der: bytes, pick: Callable[[OcspQuestion], OcspResponder | None]) -> OcspAnswer:
    """The answer to a DER request by the responder `pick` names for its CertID (None: unauthorized, RFC 6960
    2.3); never raises. Counted and timed by status (hapki.ocsp.*).

    Cached responses and malformed requests are answered without a span (thousands a second would bury real
    traces); a production, a nonce response, unauthorized, tryLater and internalError get a `cara.ocsp` span."""
    began = time.perf_counter()
    try:
        question = parse_request(der)
    except Exception as exc:  # MalformedMessage; anything else is a parser bug, and still not a 500
        if not isinstance(exc, MalformedMessage):
            log.error("OCSP request parser raised %s (a bug, answered malformedRequest)", type(exc).__name__)
        log.debug("malformed OCSP request: %s", exc)
        result = _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    else:
        responder = pick(question)
        cached = None if responder is None else responder._cached(question)
        if cached is not None:
            result = OcspAnswer(cached.status, cached.der, cached, "cache")
        else:
            with tracer.start_as_current_span("cara.ocsp") as span:
                span.set_attribute("pki.serial", format(question.serial, "x"))
                result = (_error(ocsp.OCSPResponseStatus.UNAUTHORIZED) if responder is None
                          else await responder._answer(question))
                span.set_attribute("pki.ocsp_status", result.status)
    record(result.status, time.perf_counter() - began)
    return result


class OcspRouter:
    """Answers OCSP requests about every issuing CA this member serves (one responder each: after a rollover the
    CA before keeps answering for what it issued); a CertID of none of them is unauthorized."""

    def __init__(self) -> None:
        self._responders: tuple[OcspResponder, ...] = ()

    @property
    def issuers(self) -> list[str]:
        return [responder.issuer for responder in self._responders]

    def add(self, responder: OcspResponder) -> None:
        self._responders = (*self._responders, responder)  # one assignment: requests in flight see either tuple

    def remove(self, responder: OcspResponder) -> None:
        self._responders = tuple(r for r in self._responders if r is not responder)

    def _pick(self, question: OcspQuestion) -> OcspResponder | None:
        return next((r for r in self._responders if r.authoritative(question)), None)

    async def respond(self, der: bytes) -> OcspAnswer:
        return await answer(der, self._pick)


class OcspAnswer(NamedTuple):
    """What the HTTP edge sends: the status name (metrics), the DER, the cacheable response if it is one, and where
    the answer came from: cache, produced (read and signed now, kept), nonce (signed for this request), error."""

    status: str
    der: bytes
    signed: Signed | None
    source: str


def _error(status: ocsp.OCSPResponseStatus) -> OcspAnswer:
    names = {ocsp.OCSPResponseStatus.MALFORMED_REQUEST: "malformedRequest",
             ocsp.OCSPResponseStatus.UNAUTHORIZED: "unauthorized", ocsp.OCSPResponseStatus.TRY_LATER: "tryLater",
             ocsp.OCSPResponseStatus.INTERNAL_ERROR: "internalError"}
    return OcspAnswer(names[status], unsuccessful(status), None, "error")


class OcspQuestion(NamedTuple):
    """What a single-certificate OCSP request asks: the CertID and the nonce, if any."""

    algorithm: hashes.HashAlgorithm
    serial: int
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    nonce: bytes | None


# What cryptography may raise on a request it cannot parse or represent; the fuzz target fails on anything else.
_PARSE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension)


def parse_request(der: bytes) -> OcspQuestion:
    """Parse a DER OCSP request about one certificate; MalformedMessage for anything else (never another error)."""
    if len(der) > MAX_REQUEST_BYTES:
        raise MalformedMessage(f"OCSP request is {len(der)} bytes; the limit is {MAX_REQUEST_BYTES}",
                               {"field": "body", "size": len(der), "limit": MAX_REQUEST_BYTES})
    try:
        request = ocsp.load_der_ocsp_request(der)
        question = OcspQuestion(request.hash_algorithm, request.serial_number, request.issuer_name_hash,
                                request.issuer_key_hash, _nonce(request))
    except _PARSE_ERRORS as exc:
        raise MalformedMessage(f"malformed OCSP request: {exc}"[:300], {"field": "body"}) from None
    # Found by fuzzing: a negative serial parsed, then the response builder raised (internalError and a traceback
    # in the log for every such request). Serial numbers are positive (RFC 5280 4.1.2.2): the request is malformed.
    if question.serial < 0:
        raise MalformedMessage("OCSP request for a negative serial number", {"field": "serial"})
    # RFC 8954 2.1: a nonce is 1 to 32 octets; a longer one is refused, not echoed into a signed response.
    if question.nonce is not None and not 1 <= len(question.nonce) <= MAX_NONCE_BYTES:
        raise MalformedMessage(f"OCSP nonce of {len(question.nonce)} octets; 1 to {MAX_NONCE_BYTES} allowed",
                               {"field": "nonce", "size": len(question.nonce), "limit": MAX_NONCE_BYTES})
    return question


def _nonce(request: ocsp.OCSPRequest) -> bytes | None:
    try:
        return request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()
