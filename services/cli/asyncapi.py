"""Renders the AsyncAPI document of the hapki bus from the code (FastStream); committed as contracts/asyncapi.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from faststream.specification import AsyncAPI

import hapki
from hapki.clm.app import build_broker
from hapki.contracts import subjects
from hapki.contracts.errors import ErrorCode
from hapki.contracts.models import (
    CertificateExpiring,
    CertificateIssued,
    CertificateRevoked,
    HAEvent,
    SignCertificate,
    SigningFailed,
)

# The source tree's copy (this file is services/cli/asyncapi.py; the document lives in contracts/).
ASYNCAPI_PATH = Path(__file__).resolve().parents[2] / "contracts" / "asyncapi.yaml"


def render() -> str:
    """The AsyncAPI 3.0 YAML: CLM's API and events, plus what CARA and the watcher publish."""
    broker = build_broker("nats://nats:4222", None)
    # CLM receives CARA's results on plain nats-py subscriptions (hapki.clm.results), outside the broker: declared
    # here for the document, as they are served.
    @broker.subscriber(subjects.CARA_ISSUED, title="CertificateIssued", no_reply=True)
    async def issued(body: CertificateIssued) -> None:
        """CARA stored a certificate."""

    @broker.subscriber(subjects.CARA_FAILED, title="SigningFailed", no_reply=True)
    async def failed(body: SigningFailed) -> None:
        """CARA refused a request for good."""

    broker.publisher(subjects.CARA_SIGN, title="SignCertificate", schema=SignCertificate,
                     description="CLM -> CARA work queue (stream PKI_SIGNING), Nats-Msg-Id = request_id")
    broker.publisher(subjects.CARA_ISSUED, title="CertificateIssuedEvent", schema=CertificateIssued,
                     description="CARA: a certificate was signed and stored")
    broker.publisher(subjects.CARA_FAILED, title="SigningFailedEvent", schema=SigningFailed,
                     description="CARA: a request was refused for good")
    broker.publisher(subjects.CLM_REVOKED, title="CertificateRevokedEvent", schema=CertificateRevoked,
                     description="CLM: a revocation was recorded; CARA regenerates its CRLs (core NATS, best effort)")
    broker.publisher(subjects.CLM_EXPIRING, title="CertificateExpiringEvent", schema=CertificateExpiring,
                     description="CLM expiry scheduler (VIP holder): a certificate entered an expiry window; once "
                                 "per certificate per window in stream PKI_EXPIRY, Nats-Msg-Id = issuer:serial:window")
    broker.publisher(subjects.ha_events("{tier}", "{member}"), title="HAEvent", schema=HAEvent,
                     description="watcher: a member's role changed (stream PKI_HA_EVENTS keeps the history)")
    codes = ", ".join(code.value for code in ErrorCode)
    spec = AsyncAPI(
        broker, title="hapki bus", version=hapki.__version__,
        description=(
            "Subjects and messages of hapki (pki.v1.*). Request/reply subjects answer with IssueReply, "
            "CertificateReply, RevokeReply or SearchReply (hapki.contracts.models); a refused request carries "
            "`error: {code, message, details}` "
            f"with code one of: {codes}."
        ),
    )
    # FastStream's channel order follows set iteration (hash-seeded); sort keys for a stable, diffable file.
    return yaml.safe_dump(yaml.safe_load(spec.to_specification().to_yaml()), sort_keys=True, allow_unicode=True)
