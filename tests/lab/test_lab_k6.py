"""The k6 scripts against the native lab, through the CLM VIP over HTTPS (issue 8 item 5): a short smoke run with
zero errors whose certificates are in Galera, and failover.js losing nothing while the active CLM member crashes."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from hapki.cli import k6
from hapki.lab.ha import Lab
from hapki.lab.load import connect_db, crash_member

pytestmark = pytest.mark.lab

SMOKE_SECONDS = 5
RATE = 20


@pytest.fixture(scope="module")
def csr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return k6.write_csr_pool(tmp_path_factory.mktemp("k6") / "csrs.json", 64, prefix="k6-lab")


async def _stored(lab: Lab, requester: str) -> int:
    conn = await connect_db(lab)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM certificates c JOIN requests r ON r.id = c.request_id"
                              " WHERE r.requester = %s", (requester,))
            (count,) = await cur.fetchone()
    finally:
        conn.close()
    return int(count)


def _env(lab: Lab, csr_file: Path, requester: str, **extra: object) -> dict[str, str]:
    return {"BASE_URL": lab.url("clm"), "CSR_FILE": str(csr_file), "REQUESTER": requester,
            "RUN_ID": f"{requester}-{time.time_ns()}", **{k: str(v) for k, v in extra.items()}}


def test_k6_smoke_through_the_clm_vip(lab: Lab, csr_file: Path, tmp_path: Path) -> None:
    requester = f"k6-smoke-{time.time_ns()}"
    summary = k6.run("issue.js", _env(lab, csr_file, requester, MODE="rate", RATE=RATE, SECONDS=SMOKE_SECONDS,
                                      WARMUP=0), tmp_path / "summary.json", seconds=SMOKE_SECONDS,
                     log_file=tmp_path / "k6.log", ca_bundle=lab.ca_bundle)
    assert summary.errors == 0, (tmp_path / "k6.log").read_text()[-2000:]
    assert summary.issued >= 0.9 * RATE * SMOKE_SECONDS, summary.raw
    assert asyncio.run(_stored(lab, requester)) == summary.issued


def test_k6_failover_script_loses_nothing_when_the_active_clm_member_crashes(lab: Lab, csr_file: Path,
                                                                             tmp_path: Path, timing) -> None:
    requester = f"k6-failover-{time.time_ns()}"
    active = lab.vip_holders("clm")[0]
    points = tmp_path / "points.json"
    crash = threading.Timer(3.0, crash_member, args=(lab, active))
    crash.start()
    try:
        summary = k6.run("failover.js", _env(lab, csr_file, requester, RATE=RATE, SECONDS=8, GIVE_UP=20),
                         tmp_path / "summary.json", seconds=8 + 22, log_file=tmp_path / "k6.log",
                         ca_bundle=lab.ca_bundle, extra_args=("--out", f"json={points}"))
    finally:
        crash.cancel()
        crash.join()
    gap = k6.gap(points)
    timing("k6.clm_crash_gap", gap["gap_seconds"])
    assert summary.errors == 0 and gap["lost"] == 0, k6.format_gap(gap)
    assert abs(summary.issued - 8 * RATE) <= 1 and gap["issued"] == summary.issued
    assert gap["gap_seconds"] < 5.0, k6.format_gap(gap)
    assert asyncio.run(_stored(lab, requester)) == summary.issued  # retries made no second certificate
