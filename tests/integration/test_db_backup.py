"""`hapki db backup` and `hapki db restore` as an operator runs them, on real MariaDB with CARA and CLM issuing: a
backup restored into an empty database holds every certificate issued before it, the invariants and the audit
chain; both steps are audited; a restore onto a site's data, or of a file that is not the one its manifest names,
is refused and changes nothing."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import aiomysql
import pytest

from hapki.cara import metrics as cara_metrics
from hapki.cli.client import ClmClient
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.clock import utcnow
from hapki.runtime.metrics import State
from helpers.cli import database_config_file, hapki
from integration.conftest import issue_server_certificate, query

pytestmark = pytest.mark.integration


def admin_config(env: LocalEnv, path: Path, database: str = "hapki") -> Path:
    return database_config_file(stack.database_config(env).model_copy(update={"database": database}), path)


@pytest.fixture
async def restored_db(sql: aiomysql.Connection):  # type: ignore[no-untyped-def]
    name = f"hapki_restored_{uuid.uuid4().hex[:8]}"
    await query(sql, f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        await query(sql, f"DROP DATABASE {name}")


async def test_a_backup_restored_into_an_empty_database_holds_the_site(
        env: LocalEnv, services, client: ClmClient, sql: aiomysql.Connection, restored_db: str,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    issued = [await issue_server_certificate(client, f"backup-{i}.example.com", "backup-test") for i in range(3)]
    source = admin_config(env, tmp_path / "admin.toml")
    out = tmp_path / "site.sql.gz"

    done = hapki("db", "backup", "--config", str(source), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((tmp_path / "site.sql.gz.manifest.json").read_text())
    assert manifest["bytes"] == out.stat().st_size and manifest["database"] == "hapki"
    assert out.stat().st_mode & 0o777 == 0o600
    [[detail]] = await query(sql, "SELECT detail FROM audit_entries WHERE kind = 'database.backed_up'"
                                  " ORDER BY created_at DESC LIMIT 1")
    assert json.loads(detail)["sha256"] == manifest["sha256"]
    password = stack.database_config(env).password_file.read_text().strip()  # type: ignore[union-attr]
    assert password not in done.stdout + done.stderr, "the password reached the output"
    # Recorded for the metric, which CARA reads as its own database user (grant SELECT on backups).
    [[sha, recorded_bytes]] = await query(sql, "SELECT sha256, bytes FROM backups ORDER BY created_at DESC LIMIT 1")
    assert (sha, recorded_bytes) == (manifest["sha256"], manifest["bytes"])
    cara, _clm = services
    await cara_metrics.backup_sample(cara.db, "cara-test", utcnow)()
    [(age, attributes)] = [(v, a) for v, a in State.of("hapki.db.backup.age")._observe()
                           if a.get("pki.member") == "cara-test"]
    assert 0 <= age < 60, age

    target = admin_config(env, tmp_path / "restored.toml", restored_db)
    done = hapki("db", "restore", "--config", str(target), "--backup", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invariants: ok; audit:" in done.stdout
    restored = {row[0] for row in await query(sql, f"SELECT serial FROM {restored_db}.certificates")}
    assert {reply.serial for reply in issued} <= restored
    [[before]] = await query(sql, "SELECT COUNT(*) FROM certificates")
    assert len(restored) <= before
    [[kind]] = await query(sql, f"SELECT kind FROM {restored_db}.audit_entries ORDER BY created_at DESC, id DESC"
                                " LIMIT 1")
    assert kind == "database.restored"
    verified = hapki("audit", "verify", "--config", str(target))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checked = hapki("db", "check", "--config", str(target), "--settle", "3600")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Onto a site's data: refused without --replace, nothing changed.
    [[entries]] = await query(sql, f"SELECT COUNT(*) FROM {restored_db}.audit_entries")
    again = hapki("db", "restore", "--config", str(target), "--backup", str(out))
    assert again.returncode == 1 and "holds a site's data" in again.stderr, again.stdout + again.stderr
    assert (await query(sql, f"SELECT COUNT(*) FROM {restored_db}.audit_entries"))[0][0] == entries

    # A file that is not the one its manifest names: refused before anything is loaded.
    tampered = tmp_path / "tampered.sql.gz"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    (tmp_path / "tampered.sql.gz.manifest.json").write_text(json.dumps(manifest))
    refused = hapki("db", "restore", "--config", str(target), "--backup", str(tampered), "--replace")
    assert refused.returncode == 1 and "not the file its manifest names" in refused.stderr, refused.stderr
    assert (await query(sql, f"SELECT COUNT(*) FROM {restored_db}.audit_entries"))[0][0] == entries
    # With --replace the site's data is overwritten by the backup's.
    replaced = hapki("db", "restore", "--config", str(target), "--backup", str(out), "--replace")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert {row[0] for row in await query(sql, f"SELECT serial FROM {restored_db}.certificates")} == restored


def test_a_backup_that_cannot_be_written_leaves_no_file(env: LocalEnv, tmp_path: Path) -> None:
    config = admin_config(env, tmp_path / "admin.toml", database="hapki_no_such_database")
    out = tmp_path / "missing.sql.gz"
    done = hapki("db", "backup", "--config", str(config), "--out", str(out))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hapki db backup:" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "missing.sql.gz.partial").exists()
    assert not any(os.scandir(tmp_path)) or {p.name for p in tmp_path.iterdir()} == {"admin.toml"}
    # A place it cannot write (a file where its directory should be): refused in one line, nothing left.
    (tmp_path / "not-a-directory").write_text("")
    good = admin_config(env, tmp_path / "good.toml")
    done = hapki("db", "backup", "--config", str(good), "--out", str(tmp_path / "not-a-directory" / "site.sql.gz"))
    assert done.returncode == 1 and "writing the backup" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
