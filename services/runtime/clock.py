"""Time as a dependency: services receive a clock; only entry points pick the real one."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
