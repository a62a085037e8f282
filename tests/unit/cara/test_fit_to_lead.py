"""HealthProbe.fit_to_lead (GET /health/primary, keepalived's track script): when a CARA member gives the VIP away."""

from __future__ import annotations

import pytest

from hapki.cara import http


class _Db:
    def __init__(self) -> None:
        self.status = "primary"

    async def primary_status(self, timeout: float) -> str:
        return self.status


class _Hsm:
    def health(self) -> dict[str, bool]:
        return {"hsm-a": True, "hsm-b": False}


class _Nats:
    is_connected = True


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch):
    clock = [100.0]
    monkeypatch.setattr(http.time, "monotonic", lambda: clock[0])
    db = _Db()
    return http.HealthProbe(member="cara-1", signer=None, hsm=_Hsm(), db=db, nc=_Nats()), db, clock


async def test_a_primary_node_makes_the_member_fit(probe) -> None:
    p, db, _ = probe
    assert (await p.fit_to_lead())[0] is True


async def test_only_non_primary_answers_make_it_unfit_at_once(probe) -> None:
    p, db, _ = probe
    db.status = "not_primary"
    ok, report = await p.fit_to_lead()
    assert ok is False and report["database"] == "not_primary"


async def test_silence_is_tolerated_for_the_grace_then_makes_it_unfit(probe) -> None:
    p, db, clock = probe
    await p.fit_to_lead()  # a Primary answer at t=100
    db.status = "unknown"
    clock[0] = 100.0 + http.UNKNOWN_GRACE_SECONDS - 0.1
    assert (await p.fit_to_lead())[0] is True
    clock[0] = 100.0 + http.UNKNOWN_GRACE_SECONDS + 0.1
    assert (await p.fit_to_lead())[0] is False
