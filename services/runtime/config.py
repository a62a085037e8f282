"""Config sections shared by the services: bus, database, HSM. Strict: unknown fields are refused.

Secrets are never inline: each one is a path to a file (mode 0600) or, for containers, an env variable name.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hapki.contracts.errors import ConfigInvalid

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(StrictModel):
    """What every service's config (CARA, CLM, watcher) has besides its own sections."""

    startup_wait_seconds: float = Field(
        default=600.0, ge=0, le=86400,
        description="How long a starting service waits for its database, bus or HSM to become available (a whole "
                    "site booting at once), trying again with growing pauses up to 5 s, before it gives up; other "
                    "start errors stop it at once (hapki.runtime.startup)")


def read_secret(path: Path | None, env: str | None = None) -> str:
    """Read a secret from a file (preferred) or an environment variable; strip one trailing newline."""
    if path is not None:
        return path.read_text(encoding="utf-8").rstrip("\n")
    if env is not None and env in os.environ:
        return os.environ[env]
    raise ValueError(f"secret not configured (file or env {env!r})")


def require_owner_only(path: Path, what: str) -> None:
    """Raise ValueError unless `path` belongs to the user this process runs as and its group and others have no
    access to it (mode & 0o077 == 0).

    For secrets that must stay with the service user (the HSM PIN, CLM's approval key): a service refuses to start
    on a file anyone else on the host could read, rather than use a secret that may have leaked already.
    FileNotFoundError passes through (the caller decides whether a missing file is fatal).
    """
    info = path.stat()
    mode = info.st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{what} {path} is accessible to group or others (mode {mode:04o}): it must be readable by "
                         f"the service user only; run `chmod 600 {path}`")
    if info.st_uid != os.geteuid():
        raise ValueError(f"{what} {path} belongs to uid {info.st_uid}, not to the service user (uid {os.geteuid()}), "
                         "who alone must be able to read it: chown it to the service user")


class NatsConfig(StrictModel):
    """How a service reaches the bus."""

    servers: list[str] = Field(min_length=1, description="NATS URLs, e.g. nats://127.0.0.1:4222; all cluster members")
    stream_replicas: int = Field(default=1, ge=1, le=5, description="Replicas of the signing stream (3 in the HA lab)")
    connect_timeout_seconds: float = Field(default=2.0, gt=0, description="Per-server connect timeout, seconds")
    quorum_probe_seconds: float = Field(
        default=1.0, ge=0, le=60,
        description="Every this many seconds a service asks its NATS server for JetStream (hapki.runtime.bus."
        "QuorumWatchdog); after 3 failures in a row it moves to another server of `servers`. 0: never (one server)")
    user: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Bus user (hapki.runtime.bus_auth: one per service role); None connects without credentials. "
        "The user's reply inbox is _INBOX.<user>, the only inbox it may subscribe to")
    password_file: Path | None = Field(default=None, description="File (0600) holding the bus user's password")
    tls_ca_file: Path | None = Field(
        default=None, description="PEM bundle of the CAs that issue the NATS servers' certificates; set: TLS required")
    tls_cert_file: Path | None = Field(default=None, description="Client certificate (PEM) when servers verify clients")
    tls_key_file: Path | None = Field(default=None, description="Private key (PEM) of tls_cert_file")


class DatabaseConfig(StrictModel):
    """How a service reaches MariaDB (Galera): every node, tried in order."""

    nodes: list[str] = Field(min_length=1, description="host:port of each database node")
    user: str = Field(description="Database user")
    password_file: Path | None = Field(default=None, description="File holding the password")
    password_env: str | None = Field(default="HAPKI_DB_PASSWORD", description="Env variable fallback for the password")
    database: str = Field(default="hapki", description="Schema name")
    pool_size: int = Field(default=16, ge=1, le=256, description="Connections per node")
    connect_timeout_seconds: float = Field(default=2.0, gt=0, description="TCP connect timeout, seconds")
    sync_wait: bool = Field(default=False, description="SET wsrep_sync_wait=1 on Galera for read-your-writes")
    max_attempts: int = Field(default=8, ge=1, le=50, description="Attempts per transaction before giving up")
    transaction_timeout_seconds: float = Field(
        default=3.0, gt=0, le=300,
        description="Bound on one transaction attempt once it holds a connection, seconds. Our transactions take "
        "milliseconds; one that hangs is on a node that died, was cut off or stalls in a Galera reconfiguration "
        "(~6 s on a member loss): its connection is closed and the transaction retried, once on the same node if "
        "that still answers a status read as Primary, ready and synced (a stall, or a slow moment under load), "
        "else on the next node. Long transactions (CRL signing) pass their own bound",
    )
    tls_ca_file: Path | None = Field(
        default=None, description="PEM bundle of the CAs that issue the database nodes' certificates; set: every "
        "connection uses TLS and verifies the node's certificate against it")
    fail_back_seconds: float = Field(
        default=10.0, gt=0, le=3600,
        description="After moving off a node, how often to check (a status read, in the background) whether an "
        "earlier node of `nodes` is healthy again (Primary, ready, synced); the first one found healthy on two checks "
        "in a row takes the work again, so every service writes on the same node as before. Doubles, up to 300 s, "
        "while a node given back the work fails again within 60 s",
    )
    acquire_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300,
        description="Bound on waiting for a free pooled connection, seconds. A wait here is overload, not a node "
        "failure: on expiry the attempt is retried on the same node, and the transaction fails after "
        "max_attempts",
    )


class MetricsConfig(StrictModel):
    """Where the process serves its metrics to Prometheus, and how often it samples what it must ask for."""

    listen: str | None = Field(
        description="host:port of GET /metrics (Prometheus text format); fixed ports: cara 9101, clm 9102, watcher "
                    "9103; None: no endpoint (OTLP push only, when OTEL_EXPORTER_OTLP_ENDPOINT is set)")
    sample_seconds: float = Field(
        default=5.0, gt=0, le=300,
        description="How often sampled figures (signing queue depth, Galera node state) are read, seconds")


class HSMMember(StrictModel):
    """One HSM of the cluster, reached through PKCS#11."""

    name: str = Field(description="Member name, e.g. hsm-a")
    module_path: Path = Field(description="PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so")
    token_label: str = Field(description="Token label (slot ids change; labels do not)")
    pin_file: Path = Field(description="File holding the user PIN")
    softhsm_conf: Path | None = Field(default=None, description="SOFTHSM2_CONF for this member (SoftHSM only)")


class HSMConfig(StrictModel):
    """The HSM cluster: members tried in order."""

    members: list[HSMMember] = Field(min_length=1)
    retry_down_after_seconds: float = Field(default=5.0, gt=0, description="Cool-down before a failed member is retried")


def load_toml(path: Path, model: type[T]) -> T:
    """Load and validate one TOML config file; ConfigInvalid naming the file and every field that is wrong."""
    try:
        with path.open("rb") as fh:
            return model.model_validate(tomllib.load(fh))
    except OSError as exc:
        raise ConfigInvalid(f"{path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid(f"{path}: not TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigInvalid(f"{path}: {validation_summary(exc)}") from exc


def validation_summary(exc: ValidationError) -> str:
    """A pydantic error as one line: `section.field: what is wrong` per error."""
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or '(top)'}: {error['msg']}" for error in exc.errors())
