"""Configuration of a CARA member (the CA). Strict: unknown fields are refused."""

from __future__ import annotations

from pydantic import Field

from hapki.runtime.config import DatabaseConfig, HSMConfig, NatsConfig, StrictModel


class SignerConfig(StrictModel):
    """The signing-request consumer."""

    workers: int = Field(default=32, ge=1, le=256, description="Concurrent pull workers (requests in flight)")
    fetch_timeout_seconds: float = Field(default=2.0, gt=0, description="Long-poll of one idle pull request, seconds")
    heartbeat_seconds: float = Field(default=2.0, gt=0, description="in_progress() interval for long signings, seconds")
    retry_delay_seconds: float = Field(default=1.0, ge=0, description="NAK delay after a transient failure, seconds")
    backdate_seconds: int = Field(default=60, ge=0, le=3600, description="notBefore = now - this, for clock skew")


class CaraConfig(StrictModel):
    """One CARA member."""

    member: str = Field(description="This member's name, e.g. cara-1 (recorded on epochs and intents)")
    issuer: str | None = Field(default=None, description="Issuing CA name; default: the issuer marked default")
    vip: str | None = Field(
        default=None, description="CARA floating IP: sign only while this host holds it (kernel view); None: always"
    )
    vip_poll_seconds: float = Field(default=0.05, gt=0, le=5, description="VIP ownership poll interval, seconds")
    http_listen: str | None = Field(
        default=None, description="host:port of the local CARA HTTP endpoint (health), behind haproxy on the VIP"
    )
    nats: NatsConfig
    database: DatabaseConfig
    hsm: HSMConfig
    signer: SignerConfig = SignerConfig()
