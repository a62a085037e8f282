"""Per-requester token buckets: how CLM keeps one requester from taking the RA (and the CA behind it) for itself.

In-process, per CLM member: two members behind the VIP would each allow the rate (only the VIP holder serves
in normal operation, so the effective limit is the configured one; during a failover a requester may briefly
get up to twice it). Pure and synchronous, time passed in: the caller's clock is monotonic seconds.

Buckets are keyed on who is asking as far as CLM can tell, not on what the request says: the edge that received
the request sets `caller` (the bus user the NATS server names in Nats-Request-Info, see hapki.clm.app; the client
address haproxy saw, see hapki.clm.http) around the handler, and `check` keys on it. Only a request with no
authenticated caller (published inside the services' own bus account, by the admin; a unit test) is keyed on its
self-declared `requester`. So a client cannot escape its bucket by renaming itself, nor drain another's by
borrowing its name.

Memory is bounded: at most `max_requesters` buckets, least recently used evicted first. An evicted bucket was
idle long enough to be full again, unless more than `max_requesters` requesters are active at once; then the
evicted one restarts with a full burst, which is the cost of a bound and is logged by the caller's metrics.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from hapki.contracts.errors import RateLimited


# The authenticated caller of the request being handled in this task, set by the edge (see the module doc).
_caller: ContextVar[str | None] = ContextVar("hapki_clm_caller", default=None)


@contextmanager
def caller(identity: str | None) -> Iterator[None]:
    """Within the block, buckets are keyed on `identity` (``bus:<user>``, ``addr:<ip>``) when it is not None."""
    token = _caller.set(identity)
    try:
        yield
    finally:
        _caller.reset(token)


@dataclass(frozen=True)
class Rate:
    """A token bucket's shape: `per_second` tokens added each second, at most `burst` held."""

    per_second: float
    burst: float


class RateLimiter:
    """Token buckets by caller (or requester name); `check` takes one token or raises RateLimited."""

    def __init__(
        self,
        default: Rate,
        *,
        overrides: Mapping[str, Rate] | None = None,
        max_requesters: int = 100_000,
        clock: Callable[[], float],
    ) -> None:
        if default.per_second <= 0 or default.burst < 1:
            raise ValueError("a rate needs per_second > 0 and burst >= 1")
        self._default, self._overrides = default, dict(overrides or {})
        self._max, self._clock = max_requesters, clock
        # requester -> (tokens, time of the last refill); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def rate_of(self, requester: str) -> Rate:
        """The bucket shape for this requester (its override, else the default)."""
        return self._overrides.get(requester, self._default)

    def check(self, requester: str) -> None:
        """Take one token from the caller's bucket (see `caller`; else `requester`'s), or raise RateLimited
        (taking nothing) when it is empty."""
        identity = _caller.get()
        key = requester if identity is None else identity
        rate = self.rate_of(key)
        now = self._clock()
        tokens, last = self._buckets.pop(key, (rate.burst, now))
        tokens = min(rate.burst, tokens + max(0.0, now - last) * rate.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry_after = (1.0 - tokens) / rate.per_second
            who = f"requester {key!r}" if identity is None else f"caller {key!r}"
            raise RateLimited(
                f"{who} is over its rate of {rate.per_second:g}/s (burst {rate.burst:g}); "
                f"retry after {retry_after:.3f} s",
                {"field": "requester" if identity is None else "caller", "limit_per_second": rate.per_second,
                 "burst": rate.burst},
                retry_after=retry_after,
            )
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        """How many buckets are held (for tests and metrics)."""
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """The HTTP Retry-After value (whole seconds, at least 1) for a wait of `seconds`."""
    return str(max(1, math.ceil(seconds)))
