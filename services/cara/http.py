"""The CARA HTTP edge (aiohttp), behind haproxy on the CARA floating IP: today /health.

Routes are added in `build_app`, each handler taking what it needs as an argument (the health probe here);
OCSP (`POST /ocsp`, `GET /ocsp/{request}`) and the CRL (`GET /crl/{issuer}.crl`) slot in beside /health.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiomysql
from aiohttp import web
from nats.aio.client import Client
from opentelemetry import context, trace

from hapki.cara.signer import Signer
from hapki.contracts.errors import HapkiError
from hapki.runtime.db import Database
from hapki.runtime.hsm import HSMPool

log = logging.getLogger("hapki.cara.http")

# The database answers a SELECT 1 in milliseconds; past this it is not serving, whatever it may do later.
DATABASE_TIMEOUT_SECONDS = 2.0


class HealthProbe:
    """What /health reports, read from the member's live parts."""

    def __init__(self, *, member: str, signer: Signer, hsm: HSMPool, db: Database, nc: Client) -> None:
        self._member, self._signer, self._hsm, self._db, self._nc = member, signer, hsm, db, nc

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

    async def _database(self) -> str:
        async def select_one(cur: aiomysql.Cursor) -> None:
            await cur.execute("SELECT 1")
            await cur.fetchone()

        # Not traced: haproxy polls every few seconds, and a db.commit root span per poll would bury real traces.
        token = context.attach(_unsampled())
        try:
            await asyncio.wait_for(self._db.run(select_one, name="health"), DATABASE_TIMEOUT_SECONDS)
            return "ok"
        except (HapkiError, asyncio.TimeoutError) as exc:
            log.warning("health: database unavailable: %s", exc)
            return "unavailable"
        finally:
            context.detach(token)


def build_app(probe: HealthProbe) -> web.Application:
    """The aiohttp application with CARA's routes."""
    app = web.Application()

    async def health(request: web.Request) -> web.Response:
        """GET /health: 200 when this member can serve (active or passive), 503 otherwise; the JSON says why."""
        ok, report = await probe.check()
        return web.json_response(report, status=200 if ok else 503)

    app.router.add_get("/health", health)
    return app


def _unsampled() -> context.Context:
    """A context whose parent span is valid but not sampled: the default ParentBased sampler drops its children."""
    parent = trace.SpanContext(
        trace_id=random.getrandbits(128) or 1, span_id=random.getrandbits(64) or 1, is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))
