"""Row ids that keep database inserts at the right edge of their indexes.

A random id (uuid4) puts every insert on a random page of its table's clustered index and of every index keyed by
it: once the tables outgrow the buffer pool, nearly every issuance reads and later writes back pages that are not
cached (docs/PERFORMANCE.md, Growth). A time-ordered id starts with the time, so new rows land together at the
end of the index. The layout is UUIDv7's (RFC 9562: 48 bits of Unix milliseconds, then randomness) without the
version bits, written as the 32 lowercase hex digits every id column and contract already uses; its 80 random
bits keep it unguessable. Certificate serials stay fully random (they must be unpredictable).
"""

from __future__ import annotations

import secrets
import time

__all__ = ["time_ordered_id"]


def time_ordered_id(now: float | None = None) -> str:
    """32 lowercase hex digits: 12 of Unix milliseconds (``now``, default the clock), then 20 random."""
    millis = int((time.time() if now is None else now) * 1000) & 0xFFFF_FFFF_FFFF
    return f"{millis:012x}{secrets.token_hex(10)}"
