"""Configuration of a CARA member (the CA). Strict: unknown fields are refused."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, model_validator

from hapki.runtime.config import DatabaseConfig, HSMConfig, MetricsConfig, NatsConfig, ServiceConfig, StrictModel
from hapki.runtime.metrics import PORTS

# Overrides [signer] processes of a loaded config (with_env): one switch for the lab, the demo and the benchmarks.
SIGNER_PROCESSES_ENV = "HAPKI_SIGNER_PROCESSES"


class SignerConfig(StrictModel):
    """The signing-request consumer."""

    batch: int = Field(
        default=64, ge=1, le=256,
        description="Most signing requests fetched and worked on together (one reservation, one HSM thread hop, one "
                    "commit); a fetch never waits for a batch to fill",
    )
    batches_in_flight: int = Field(
        default=2, ge=1, le=64,
        description="Batches worked on at once (one reserving, one signing, one committing, ...); while all are "
                    "busy, requests wait in the stream and the next fetch takes them together. 2 took less CPU per "
                    "issuance than 4 in the HA lab (larger batches; docs/PERFORMANCE.md)",
    )
    fetch_timeout_seconds: float = Field(default=2.0, gt=0, description="Long-poll of one idle pull request, seconds")
    heartbeat_seconds: float = Field(
        default=0.1, gt=0,
        description="in_progress() for long signings, seconds: a message held this long since it was admitted or last "
                    "reported gets one, so at most twice this passes between reports (well under ack_wait, 0.5 s)",
    )
    retry_delay_seconds: float = Field(default=1.0, ge=0, description="NAK delay after a transient failure, seconds")
    backdate_seconds: int = Field(default=60, ge=0, le=3600, description="notBefore = now - this, for clock skew")
    processes: int = Field(
        default=1, ge=1, le=16,
        description="Signer processes on the active member: the main CARA process and processes - 1 signer "
                    "workers (hapki.cara.signer_worker), each with its own database pool, bus connection and "
                    "PKCS#11 session, all on the one signing consumer under the member's epoch. Env "
                    f"{SIGNER_PROCESSES_ENV} overrides it. More than 1 helps only with spare cores "
                    "(docs/PERFORMANCE.md, \"several signer processes\")",
    )


class CrlConfig(StrictModel):
    """CRL generation (active member only). CA/Browser Forum BR 4.9.7: nextUpdate at most 10 days after thisUpdate."""

    full_interval_seconds: int = Field(default=3600, ge=10, description="A new full CRL at least this often, seconds")
    delta_interval_seconds: int = Field(default=300, ge=5, description="A new delta CRL at least this often, seconds")
    full_validity_seconds: int = Field(
        default=7 * 86400, ge=3600, le=10 * 86400, description="nextUpdate - thisUpdate of a full CRL, seconds"
    )
    delta_validity_seconds: int = Field(
        default=86400, ge=600, le=10 * 86400, description="nextUpdate - thisUpdate of a delta CRL, seconds"
    )
    poll_seconds: float = Field(
        default=2.0, gt=0, le=60,
        description="How often the active member checks the schedule and for revocations on no CRL yet, seconds "
                    "(a pki.v1.clm.revoked event wakes it at once)",
    )


class OcspConfig(StrictModel):
    """The OCSP responder (every member answers, active or passive) and its cache of signed responses.

    Revocation visibility (docs/ARCHITECTURE.md, "OCSP responses from a cache"): a member answers from its cache
    only while its last successful revocation poll began at most `max_staleness_seconds` ago, and a revocation
    event from CLM drops the certificate's cached answers at once; haproxy on the VIP may serve a GET answer it
    stored for up to `http_max_age_seconds` more. Worst case: max_staleness_seconds + http_max_age_seconds.
    """

    validity_seconds: int = Field(default=3600, ge=60, le=7 * 86400,
                                  description="nextUpdate - thisUpdate of a response, seconds")
    cache_entries: int = Field(
        default=20_000, ge=0, le=1_000_000,
        description="Certificates whose signed responses a member keeps in memory (least recently used dropped "
                    "first; about 1 KiB each); 0: no cache, every request is read and signed")
    refresh_seconds: int | None = Field(
        default=None, ge=10,
        description="A cached response older than this is produced again (in the background; the old one is "
                    "served meanwhile), seconds; below validity_seconds. Default: half of validity_seconds")
    revocation_poll_seconds: float = Field(
        default=1.0, gt=0, le=60,
        description="How often a member reads the revocations recorded since its last read, seconds (the "
                    "backstop of the pki.v1.clm.revoked event, which is not delivered to a member cut off the bus)")
    max_staleness_seconds: float = Field(
        default=3.0, gt=0, le=300,
        description="Cached answers are used only while the last successful revocation poll began at most this "
                    "long ago, seconds; otherwise every request is read and signed (tryLater while the database "
                    "is away). More than revocation_poll_seconds")
    http_max_age_seconds: int = Field(
        default=5, ge=0, le=3600,
        description="Cache-Control max-age of a cacheable answer, seconds: how long haproxy (and any HTTP cache) "
                    "may serve a GET answer without asking the member; added to the revocation bound")
    echo_nonce: bool = Field(
        default=True,
        description="Answer a request carrying a nonce (RFC 8954) with a response signed for it, echoing the "
                    "nonce (a database read and an HSM signature, never cached). False: ignore nonces as RFC 5019 "
                    "allows and answer every request from the cache")
    signer_renew_before_days: int = Field(
        default=30, ge=1, le=80,
        description="The active member certifies the OCSP responder's key again when its certificate (90 days) has "
                    "fewer days left than this; every member signs with the newest certificate "
                    "(hapki.cara.ocsp_signer)")
    signer_check_seconds: float = Field(
        default=300.0, gt=0, le=86400,
        description="How often each member reads which OCSP responder certificate is newest (and the active one "
                    "whether it is due for renewal), seconds")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> OcspConfig:
        if self.refresh_seconds is not None and self.refresh_seconds >= self.validity_seconds:
            raise ValueError(f"ocsp.refresh_seconds ({self.refresh_seconds}) must be below validity_seconds "
                             f"({self.validity_seconds})")
        if self.revocation_poll_seconds >= self.max_staleness_seconds:
            raise ValueError(f"ocsp.revocation_poll_seconds ({self.revocation_poll_seconds}) must be below "
                             f"max_staleness_seconds ({self.max_staleness_seconds})")
        return self

    @property
    def refresh_after_seconds(self) -> int:
        """Age at which a cached response is produced again."""
        return self.refresh_seconds if self.refresh_seconds is not None else self.validity_seconds // 2

    @property
    def revocation_bound_seconds(self) -> float:
        """Longest a revocation can stay invisible to a client of the VIP (member cache + haproxy cache)."""
        return self.max_staleness_seconds + self.http_max_age_seconds


class AuditConfig(StrictModel):
    """The audit sealer (active member only): chains the entries every writer appended, fenced by the epoch."""

    seal_interval_seconds: float = Field(
        default=0.25, gt=0, le=60,
        description="How often the active member chains new audit entries, seconds (the window in which the newest "
                    "entries are not chained yet)",
    )
    batch: int = Field(default=2000, ge=1, le=20000, description="Most entries chained in one transaction")
    checkpoint_interval_seconds: float = Field(
        default=1.0, gt=0, le=3600,
        description="How often at most the sealer signs the head with the audit signer's HSM key, seconds (one HSM "
                    "signature and one row each time the head moved)",
    )


class CaraConfig(ServiceConfig):
    """One CARA member."""

    member: str = Field(description="This member's name, e.g. cara-1 (recorded on epochs and intents)")
    issuer: str | None = Field(default=None, description="Issuing CA name; default: the issuer marked default")
    issuers_check_seconds: float = Field(
        default=10.0, gt=0, le=3600,
        description="How often each member reads the issuing CAs: a new one (`hapki ca rollover`) is served "
                    "(OCSP, CRLs) and, once it is the default, issued from within this many seconds")
    vip: str | None = Field(
        default=None, description="CARA floating IP: sign only while this host holds it (kernel view); None: always"
    )
    vip_poll_seconds: float = Field(
        default=0.05, gt=0, le=5,
        description="VIP ownership poll interval, seconds, while the signer's state does not match it yet (a start "
        "or a signer worker's join to retry, a fenced back-off)",
    )
    vip_recheck_seconds: float = Field(
        default=1.0, gt=0, le=30,
        description="Longest wait between two reads of VIP ownership while the signer's state matches it: the "
        "kernel announces every address change (netlink), which is read at once",
    )
    http_listen: str | None = Field(
        default=None, description="host:port of the local CARA HTTP endpoint (health), behind haproxy on the VIP"
    )
    nats: NatsConfig
    database: DatabaseConfig
    hsm: HSMConfig
    approval_public_keys: list[Path] = Field(
        min_length=1, max_length=16,
        description="CLM approval public keys this CA trusts (PEM files, P-256 or Ed25519): a signing request must carry a "
        "valid approval by one of them or it is refused (APPROVAL_INVALID). Several during a key rotation",
    )
    profiles_file: Path | None = Field(
        default=None,
        description="Profiles TOML the CA re-checks every approved request against (POLICY_VIOLATION otherwise); "
        "must be CLM's profiles; default: the packaged profiles.toml",
    )
    signer: SignerConfig = SignerConfig()
    public_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/]+$",
        description="Base URL of the CARA VIP as relying parties reach it, e.g. https://10.213.2.100: issued "
                    "certificates get CRL distribution point <url>/crl/<issuer>.crl and AIA OCSP <url>/ocsp. "
                    "None: no CDP and no AIA",
    )
    crl: CrlConfig = CrlConfig()
    ocsp: OcspConfig = OcspConfig()
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = Field(
        default=MetricsConfig(listen=f"0.0.0.0:{PORTS['cara']}"),
        description="GET /metrics for Prometheus (port 9101) and the sampling interval")


def with_env(config: CaraConfig, environ: Mapping[str, str] | None = None) -> CaraConfig:
    """`config` with the settings the environment overrides (SIGNER_PROCESSES_ENV); ValueError if one is invalid."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SIGNER_PROCESSES_ENV, "").strip()
    if not raw:
        return config
    if not raw.isdigit():
        raise ValueError(f"{SIGNER_PROCESSES_ENV}={raw!r}: a whole number of signer processes, 1 to 16")
    data = config.model_dump()
    data["signer"]["processes"] = int(raw)
    return CaraConfig.model_validate(data)  # the field's bounds apply (ValidationError is a ValueError)
