"""The CARA HTTP edge (aiohttp), behind haproxy on the CARA floating IP: /health, CRLs and OCSP.

Routes are added in `build_app`, each handler taking what it needs as an argument. Every member serves all of
them, passive ones too: CRLs come from the database, OCSP answers are signed by the delegated OCSP signer.
- GET /crl/{issuer}.crl, GET /crl/{issuer}-delta.crl: the latest full / delta CRL, DER, application/pkix-crl.
- POST /ocsp (body: DER request), GET /ocsp/{base64 DER request} (RFC 6960 appendix A): application/ocsp-response,
  always HTTP 200 with an OCSP response, an error status (malformedRequest, tryLater, ...) included. A
  cacheable answer to a GET says so (Cache-Control max-age, ETag, Last-Modified; haproxy on the VIP stores it);
  everything else says no-store. Header X-Hapki-Ocsp-Source names where the answer came from.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import aiomysql
from aiohttp import web
from cryptography.x509 import ocsp as x509_ocsp
from nats.aio.client import Client
from opentelemetry import context

from hapki.cara.ocsp import OcspAnswer, unsuccessful
from hapki.cara.ocsp_cache import Signed
from hapki.cara.ocsp import record as record_ocsp
from hapki.cara.ports import CrlRecord
from hapki.cara.signer import Signer
from hapki.contracts.errors import HapkiError
from hapki.contracts.limits import MAX_OCSP_GET_CHARS, MAX_OCSP_REQUEST_BYTES
from hapki.runtime.db import Database, execute_many
from hapki.runtime import telemetry
from hapki.runtime.clock import utcnow
from hapki.runtime.hsm import HSMPool

log = logging.getLogger("hapki.cara.http")

# The database answers a SELECT 1 in milliseconds; past this it is not serving, whatever it may do later.
DATABASE_TIMEOUT_SECONDS = 2.0
UNKNOWN_GRACE_SECONDS = 5.0  # no answer from any database node for this long: unfit to lead
PRIMARY_TIMEOUT_SECONDS = 1.0  # /health/primary's database bound: under the track script's curl --max-time (1.5 s)


class HealthProbe:
    """What /health reports, read from the member's live parts."""

    def __init__(self, *, member: str, signer: Signer, hsm: HSMPool, db: Database, nc: Client) -> None:
        self._member, self._signer, self._hsm, self._db, self._nc = member, signer, hsm, db, nc
        self._last_primary = time.monotonic()  # the last time a database node said it is in the Primary component

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """(can this member serve, the report). A passive but healthy member can serve: `active` says which."""
        hsm = await asyncio.to_thread(self._hsm.health)  # takes the PKCS#11 lock, which a C_Sign may hold
        database = await self._database()
        nats = "connected" if self._nc.is_connected else "disconnected"
        report = {
            "member": self._member, "active": self._signer.active, "epoch": self._signer.epoch,
            "hsm": hsm, "database": database, "nats": nats,
        }
        return any(hsm.values()) and database == "ok" and nats == "connected", report

    async def fit_to_lead(self) -> tuple[bool, dict[str, Any]]:
        """(may this member hold the CARA VIP, the report): keepalived's track script asks this every second.

        An HSM member up, the bus connected, and a database node in Galera's Primary component reachable. A
        cluster-wide stall (a Galera node lost, not yet evicted) does not fail it: every member would fail at once
        and the VIP would move back and forth for nothing. Left with only non-Primary (or refusing) nodes, it fails
        at once; with no answer at all (cut off, or a starved host) only after UNKNOWN_GRACE_SECONDS without a
        Primary answer. A failing member's VRRP priority drops below its peer's: a CA cut off from the quorum
        gives the VIP away.
        """
        hsm = await asyncio.to_thread(self._hsm.health)
        status = await self._db.primary_status(PRIMARY_TIMEOUT_SECONDS)
        now = time.monotonic()
        if status == "primary":
            self._last_primary = now
        database = status == "primary" or (status == "unknown" and now - self._last_primary < UNKNOWN_GRACE_SECONDS)
        nats = self._nc.is_connected
        report = {"member": self._member, "hsm": any(hsm.values()), "database": status, "nats": nats}
        return any(hsm.values()) and database and nats, report

    async def _database(self) -> str:
        async def select_one(cur: aiomysql.Cursor) -> None:
            await execute_many(cur, [("SELECT 1", ())], commit=True)  # the read and its COMMIT: one round trip

        # Not traced: haproxy polls every few seconds, and a db.commit root span per poll would bury real traces.
        token = context.attach(telemetry.unsampled())
        try:
            await asyncio.wait_for(self._db.run(select_one, name="health"), DATABASE_TIMEOUT_SECONDS)
            return "ok"
        except (HapkiError, asyncio.TimeoutError) as exc:
            log.warning("health: database unavailable: %s", exc)
            return "unavailable"
        finally:
            context.detach(token)


class OcspAnswerer(Protocol):
    """OcspRouter (every issuer a member serves) or one OcspResponder."""

    async def respond(self, der: bytes) -> OcspAnswer: ...


class CrlReader(Protocol):
    async def latest_crl(self, issuer: str, *, delta: bool) -> CrlRecord | None: ...


CRL_TYPE = "application/pkix-crl"
# Where an OCSP answer came from (cache, produced, nonce, error): for benchmarks and operators, not for clients.
SOURCE_HEADER = "X-Hapki-Ocsp-Source"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
_CRL_NAME = re.compile(r"^(?P<issuer>[A-Za-z0-9._-]{1,64}?)(?P<delta>-delta)?\.crl$")


def build_app(probe: HealthProbe, *, crls: CrlReader | None = None, ocsp: OcspAnswerer | None = None,
              ocsp_max_age: int = 0, clock: Callable[[], datetime] = utcnow) -> web.Application:
    """The aiohttp application with CARA's routes (/crl with `crls`, /ocsp always: unauthorized without `ocsp`).

    A cacheable OCSP answer to a GET carries RFC 5019 6.2 caching headers with max-age at most `ocsp_max_age`
    seconds (haproxy on the VIP caches it that long); every other OCSP answer says no-store."""
    # No route takes a larger body than an OCSP request; aiohttp refuses more with 413 before a handler runs.
    app = web.Application(client_max_size=MAX_OCSP_REQUEST_BYTES)

    async def crl(request: web.Request) -> web.Response:
        """GET /crl/{issuer}.crl or /crl/{issuer}-delta.crl: the latest CRL of that kind, from the database."""
        match = _CRL_NAME.match(request.match_info["name"])
        if match is None or crls is None:
            return web.Response(status=404, text="no such CRL\n")
        try:
            record = await crls.latest_crl(match["issuer"], delta=match["delta"] is not None)
        except HapkiError as exc:
            log.warning("CRL not served: %s", exc)
            return web.Response(status=503, text="CRL temporarily unavailable\n", headers={"Retry-After": "1"})
        if record is None:
            return web.Response(status=404, text="no such CRL\n")
        return web.Response(body=record.der, content_type=CRL_TYPE,
                            headers={"Last-Modified": _http_date(record.this_update)})

    async def ocsp_post(request: web.Request) -> web.Response:
        """POST /ocsp: the DER request is the body."""
        if request.content_length is not None and request.content_length > MAX_OCSP_REQUEST_BYTES:
            return _ocsp_malformed()
        body = await request.content.read(MAX_OCSP_REQUEST_BYTES + 1)
        if len(body) > MAX_OCSP_REQUEST_BYTES:
            return _ocsp_malformed()
        return await _ocsp_answer(body, get=False)

    async def ocsp_get(request: web.Request) -> web.Response:
        """GET /ocsp/{url-encoded base64 of the DER request}."""
        raw = request.rel_url.raw_path.removeprefix("/ocsp/")
        if len(raw) > MAX_OCSP_GET_CHARS:  # refused before decoding (aiohttp's own line limit is 8190)
            return _ocsp_malformed()
        try:
            der = base64.b64decode(urllib.parse.unquote(raw), validate=True)
        except (binascii.Error, ValueError):
            return _ocsp_malformed()
        return await _ocsp_answer(der, get=True)

    async def _ocsp_answer(der: bytes, *, get: bool) -> web.Response:
        if ocsp is None:  # no delegated OCSP signer for this member's issuer (`hapki ca init` creates one)
            record_ocsp("unauthorized", 0.0)
            return _ocsp_reply(unsuccessful(x509_ocsp.OCSPResponseStatus.UNAUTHORIZED))
        answer = await ocsp.respond(der)
        headers = {SOURCE_HEADER: answer.source}
        if get and answer.signed is not None and ocsp_max_age > 0:
            headers.update(cache_headers(answer.signed, ocsp_max_age, clock()))
        else:
            headers["Cache-Control"] = "no-store"
        return _ocsp_reply(answer.der, headers)

    async def health(request: web.Request) -> web.Response:
        """GET /health: 200 when this member can serve (active or passive), 503 otherwise; the JSON says why."""
        ok, report = await probe.check()
        return web.json_response(report, status=200 if ok else 503)

    async def health_primary(request: web.Request) -> web.Response:
        """GET /health/primary: 200 when this member is fit to hold the VIP (see HealthProbe.fit_to_lead)."""
        ok, report = await probe.fit_to_lead()
        if not ok:
            log.warning("not fit to hold the CARA VIP: %s", report)
        return web.json_response(report, status=200 if ok else 503)

    app.router.add_get("/health", health)
    app.router.add_get("/health/primary", health_primary)
    app.router.add_get("/crl/{name}", crl)
    app.router.add_post("/ocsp", ocsp_post)
    app.router.add_get("/ocsp/{request:.+}", ocsp_get)
    return app


def _ocsp_malformed() -> web.Response:
    """malformedRequest for a request refused at the HTTP edge (too large, not base64), counted like the others."""
    record_ocsp("malformedRequest", 0.0)
    return _ocsp_reply(unsuccessful(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST))


def _ocsp_reply(der: bytes, headers: dict[str, str] | None = None) -> web.Response:
    # RFC 6960 A.1: OCSP errors are OCSP responses too, sent with HTTP 200.
    return web.Response(body=der, content_type=OCSP_RESPONSE_TYPE, headers=headers or {"Cache-Control": "no-store"})


def cache_headers(signed: Signed, max_age: int, now: datetime) -> dict[str, str]:
    """RFC 5019 6.2 headers of a cacheable response: max-age never past nextUpdate, and at most `max_age` seconds
    (the revocation bound: an HTTP cache keeps serving what it stored without asking)."""
    left = int((signed.next_update - now).total_seconds())
    return {
        "Cache-Control": f"max-age={max(0, min(max_age, left))}, public, no-transform, must-revalidate",
        "Last-Modified": _http_date(signed.this_update),
        "ETag": f'"{hashlib.sha256(signed.der).hexdigest()[:32]}"',
    }


def _http_date(moment: datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")

