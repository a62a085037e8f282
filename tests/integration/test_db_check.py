"""`hapki db check`: the DESIGN.md invariants on a site's database, as an operator runs them. A database after the
ceremony holds them (exit 0); a certificate no issued intent accounts for is named (exit 1, its serial on the line);
on a live site a request in flight is not called lost, one left pending past --settle is. No services run in this
module's env: CLM's outbox sweep would republish the pending request planted here."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import aiomysql
import pytest

from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.invariants import CHECKS
from helpers.cli import database_config_file, hapki

pytestmark = pytest.mark.integration

ISSUER = "db-check-test"


@pytest.fixture
def admin_config(env: LocalEnv, tmp_path: Path) -> Path:
    return database_config_file(stack.database_config(env), tmp_path / "admin.toml")


def check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return hapki("db", "check", "--config", str(config), *args, timeout=120)


async def test_db_check_names_what_violates_an_invariant(env: LocalEnv, sql: aiomysql.Connection,
                                                         admin_config: Path) -> None:
    clean = check(admin_config)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # Every invariant, and the one node's durability settings.
    assert clean.stdout.count("ok   ") == len(CHECKS) + 1 and "FAIL" not in clean.stdout
    serial, request = uuid.uuid4().hex[:32], uuid.uuid4().hex
    async with sql.cursor() as cur:
        # A certificate no intent accounts for (a signature nobody can explain), and a request pending for an hour.
        await cur.execute(
            "INSERT INTO certificates (issuer, serial, request_id, intent_id, epoch, cert_pem, not_before, not_after,"
            " created_at) VALUES (%s, %s, %s, %s, 1, 'test', UTC_TIMESTAMP(), UTC_TIMESTAMP(), UTC_TIMESTAMP())",
            (ISSUER, serial, uuid.uuid4().hex, uuid.uuid4().hex))
        await cur.execute(
            "INSERT INTO requests (id, requester, idempotency_key, profile, status, csr_sha256, sign_request,"
            " created_at, updated_at) VALUES (%s, 'tests', %s, 'tls-server', 'pending', %s, '{}',"
            " UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR)",
            (request, uuid.uuid4().hex, "0" * 64))
    try:
        found = check(admin_config)
        assert found.returncode == 1, found.stdout + found.stderr
        lines = found.stdout.splitlines()
        failing = [line for line in lines if line.startswith("FAIL")]
        assert [line.split()[1] for line in failing] == ["certificate_without_issued_intent:", "pending_requests:"]
        assert any(serial in line for line in lines) and any(request in line for line in lines)
        # In flight is not lost: with a settle window longer than its age, the pending request is not a finding.
        settled = check(admin_config, "--settle", "7200")
        assert [line.split()[1] for line in settled.stdout.splitlines() if line.startswith("FAIL")] == [
            "certificate_without_issued_intent:"]
    finally:
        async with sql.cursor() as cur:
            await cur.execute("DELETE FROM certificates WHERE issuer = %s", (ISSUER,))
            await cur.execute("DELETE FROM requests WHERE id = %s", (request,))
    assert check(admin_config).returncode == 0


def test_db_check_names_a_node_that_would_lose_commits_in_a_power_cut(env: LocalEnv, admin_config: Path) -> None:
    """innodb_flush_log_at_trx_commit 2 keeps the last second of commits in memory on every node: a power cut of
    the whole site loses them (hapki.runtime.durability). The node and the setting are named; 1 is clean again."""
    node = stack.database_config(env).nodes[0]
    env.db.sql("SET GLOBAL innodb_flush_log_at_trx_commit = 2")
    try:
        found = check(admin_config)
        assert found.returncode == 1, found.stdout + found.stderr
        failing = [line for line in found.stdout.splitlines() if line.startswith("FAIL")]
        assert failing == [f"FAIL durability of {node}: commits survive a power cut of the whole site"], failing
        assert "innodb_flush_log_at_trx_commit = 2 (wanted 1)" in found.stdout
        report = json.loads(check(admin_config, "--json").stdout)
        assert report["ok"] is False
        assert report["durability"][node]["settings"]["innodb_flush_log_at_trx_commit"] == "2"
    finally:
        env.db.sql("SET GLOBAL innodb_flush_log_at_trx_commit = 1")
    assert check(admin_config).returncode == 0
