"""Configuration of a CLM member (the RA). Strict: unknown fields are refused."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hapki.runtime.config import DatabaseConfig, NatsConfig, StrictModel


class ClmConfig(StrictModel):
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
    wait_seconds: float = Field(
        default=10.0, gt=0, le=60, description="How long an issue request waits for the CA before replying pending"
    )
    republish_after_seconds: float = Field(
        default=15.0, gt=0, description="Republish a request still pending after this long (outbox sweep), seconds"
    )
    republish_interval_seconds: float = Field(default=5.0, gt=0, description="Period of the outbox sweep, seconds")
