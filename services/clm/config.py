"""Configuration of a CLM member (the RA). Strict: unknown fields are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from hapki.runtime.config import DatabaseConfig, MetricsConfig, NatsConfig, ServiceConfig, StrictModel
from hapki.runtime.metrics import PORTS


class RateLimitRule(StrictModel):
    """One token bucket: a sustained rate and a burst."""

    per_second: float = Field(gt=0, le=1_000_000, description="Requests added to the bucket each second, requests/s")
    burst: int = Field(ge=1, le=1_000_000, description="Most requests the bucket holds: a burst after idling, requests")


class RateLimitConfig(StrictModel):
    """Rates per requester on the commands that cost work (issue, renew, revoke), per CLM member, in process.

    The default is a guard, not a quota: above what one CLM member issues (several hundred per second), so the
    benchmark and the lab's load run unhindered, while one runaway requester cannot take the whole RA. Give
    tight quotas per requester in `overrides`.
    """

    default: RateLimitRule = Field(
        default=RateLimitRule(per_second=1000, burst=2000), description="Bucket of every requester without an override"
    )
    overrides: dict[str, RateLimitRule] = Field(
        default_factory=dict, max_length=10_000,
        description="Bucket by caller, replacing the default: `bus:<NATS user>` for clients on the bus, "
        "`addr:<IP>` for HTTPS clients (the address haproxy saw), a requester name for requests that come with no "
        "authenticated caller (see hapki.clm.ratelimit)"
    )
    max_requesters: int = Field(
        default=100_000, ge=1, le=10_000_000,
        description="Most buckets held in memory; the least recently used is dropped first, requesters",
    )


# A window is at most the longest certificate lifetime a profile may have (398 days).
WindowSeconds = Annotated[int, Field(gt=0, le=398 * 86400)]


class ClmConfig(ServiceConfig):
    """One CLM member."""

    member: str = Field(description="This member's name, e.g. clm-1")
    nats: NatsConfig
    database: DatabaseConfig
    vip: str | None = Field(
        default=None, description="CLM floating IP: run schedulers only while this host holds it; None: always"
    )
    vip_poll_seconds: float = Field(default=0.05, gt=0, le=5, description="VIP ownership poll interval, seconds")
    http_listen: str | None = Field(
        default=None, description="host:port of the local CLM REST API, behind haproxy on the VIP"
    )
    profiles_file: Path | None = Field(default=None, description="Profiles TOML; default: the packaged profiles.toml")
    approval_key_file: Path = Field(
        description="CLM's approval private key, P-256 or Ed25519 (PEM, PKCS#8, unencrypted), readable by the service user "
        "only (mode 0600, else CLM refuses to start): it signs every signing request; CARA trusts its public key "
        "(`approval_public_keys`). Create a pair with `hapki clm keygen`"
    )
    wait_seconds: float = Field(
        default=10.0, gt=0, le=60, description="How long an issue request waits for the CA before replying pending"
    )
    record_transactions_in_flight: int = Field(
        default=1, ge=1, le=64,
        description="Most transactions recording new requests at once; requests arriving meanwhile are recorded "
                    "together by the next one (fewer round trips and Galera write-sets under load, one round trip "
                    "more of latency at most). 1 took the least CPU per issuance in the HA lab (docs/PERFORMANCE.md)",
    )
    republish_after_seconds: float = Field(
        default=15.0, gt=0, description="Republish a request still pending after this long (outbox sweep), seconds"
    )
    republish_interval_seconds: float = Field(default=5.0, gt=0, description="Period of the outbox sweep, seconds")
    expiry_windows_seconds: list[WindowSeconds] = Field(
        default=[30 * 86400, 7 * 86400, 86400], max_length=16,
        description="Expiry notice windows, seconds before not_after: one pki.v1.clm.expiring per certificate per "
                    "window it enters; empty: no expiry scheduler",
    )
    expiry_interval_seconds: float = Field(
        default=60.0, gt=0, le=86400, description="Period of the expiry scheduler (VIP holder only), seconds"
    )
    trusted_proxies: list[str] = Field(
        default=["127.0.0.1", "::1"], max_length=64,
        description="Peer addresses of the REST API whose X-Forwarded-For is believed (the local haproxy, which "
        "sets it to the client address): HTTPS rate limits key on that address; any other peer on its own",
    )
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig, description="Per-requester token buckets on issue, renew and revoke"
    )
    expiry_batch: int = Field(
        default=500, ge=1, le=10_000, description="Most notices one run records per window, and publishes"
    )
    metrics: MetricsConfig = Field(
        default=MetricsConfig(listen=f"0.0.0.0:{PORTS['clm']}"),
        description="GET /metrics for Prometheus (port 9102) and the sampling interval")

    @field_validator("expiry_windows_seconds")
    @classmethod
    def _distinct(cls, windows: list[int]) -> list[int]:
        if len(set(windows)) != len(windows):
            raise ValueError("expiry windows must be distinct")
        return windows
