"""Backups of a site's database (`hapki db backup`, `hapki db restore`): what to do when the database itself is
lost, not one node of it (every Galera node's disk, a wrong `DROP`, a site rebuilt elsewhere).

The database is the CA's memory: without it the CA cannot say what it issued, answer OCSP or revoke. A backup is
`mariadb-dump --single-transaction` of the site's database from one Primary, ready node: one consistent InnoDB
snapshot, taken without locks while the site keeps issuing (Galera replicates rows, so any such node has all of
them). It is written gzip-compressed with a manifest beside it (`<file>.manifest.json`: when, from which node,
the schema version, the file's SHA-256 and size), and audited (`database.backed_up`, with that hash).

A restore loads a backup into a database that holds no site data (an empty one: a rebuilt cluster, or another
schema to inspect), after checking the file against its manifest; `--replace` is needed to overwrite one that
does. It is audited there too (`database.restored`). What was issued after the backup is not in it: the audit
chain then ends at the backup's head, which `hapki audit verify --anchor` (an anchor noted after the backup)
reports as truncated.

Credentials reach the MariaDB client tools in a 0600 defaults file that exists only while they run, never on a
command line (where `ps` shows it) or in a log.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from hapki.contracts.errors import BackupRefused
from hapki.runtime.config import DatabaseConfig, read_secret
from hapki.runtime.db import Database, db_time, utc

__all__ = ["DUMP_OPTIONS", "Manifest", "SITE_TABLES", "choose_node", "dump", "manifest_path", "newest",
           "record_statement", "restore", "site_rows"]

FORMAT = "hapki-db-backup/1"
# One consistent snapshot without locks (InnoDB); binary columns as hex (no charset surprises); no LOCK TABLES in
# the file (Galera replicates no explicit table locks); no tablespaces (that would need PROCESS).
DUMP_OPTIONS = ("--single-transaction", "--quick", "--hex-blob", "--no-tablespaces", "--skip-add-locks",
                "--default-character-set=utf8mb4")
# Tables whose rows make a database a site's: a restore refuses to overwrite them without --replace.
SITE_TABLES = ("requests", "certificates", "signing_intents", "issuers", "audit_entries")
CHUNK = 1 << 20
TOOL_TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class Manifest:
    format: str
    created_at: str
    node: str
    database: str
    schema_version: int
    sha256: str
    bytes: int
    tool: str

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except FileNotFoundError as exc:
            raise BackupRefused(f"no manifest {path}: the backup cannot be checked") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupRefused(f"{path} is not a hapki backup manifest: {exc}") from exc


def record_statement(backup_id: str, manifest: Manifest, out: Path) -> tuple[str, tuple[object, ...]]:
    """The `backups` row of a backup just written (migration 0011), for the transaction of its audit entry."""
    return ("INSERT INTO backups (id, created_at, node, file, bytes, sha256, schema_version)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (backup_id, db_time(datetime.fromisoformat(manifest.created_at)), manifest.node, out.name[:255],
             manifest.bytes, manifest.sha256, manifest.schema_version))


async def newest(db: Database) -> datetime | None:
    """When the newest backup recorded in `backups` was taken; None: none yet."""

    async def body(cur) -> datetime | None:  # type: ignore[no-untyped-def]
        await cur.execute("SELECT MAX(created_at) FROM backups")
        return utc((await cur.fetchone())[0])

    return await db.run(body, name="metrics.backup_age")


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + ".manifest.json")


async def choose_node(db: Database) -> str:
    """The first configured node that is Primary, ready and synced (or runs without Galera): Database.fit."""
    for node in db.nodes:
        if await db.fit(node):
            return node
    raise BackupRefused(f"no database node of {', '.join(db.nodes)} answers as Primary, ready and synced")


async def site_rows(db: Database) -> dict[str, int]:
    """Rows in each of SITE_TABLES that exists in the configured database."""

    async def body(cur) -> dict[str, int]:  # type: ignore[no-untyped-def]
        await cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
                          f" AND table_name IN ({', '.join(['%s'] * len(SITE_TABLES))})", SITE_TABLES)
        found = {}
        for (table,) in await cur.fetchall():
            await cur.execute(f"SELECT COUNT(*) FROM `{table}`")
            found[str(table)] = int((await cur.fetchone())[0])
        return found

    return await db.run(body, name="backup.site_rows", timeout=600.0)


async def schema_version(db: Database) -> int:
    async def body(cur) -> int:  # type: ignore[no-untyped-def]
        await cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int((await cur.fetchone())[0])

    return await db.run(body, name="backup.schema_version")


@contextlib.contextmanager
def client_defaults(config: DatabaseConfig, node: str) -> Iterator[Path]:
    """A [client] option file for the MariaDB tools (user, password, node, TLS), mode 0600, removed after."""
    host, _, port = node.rpartition(":")
    lines = ["[client]", f"user={config.user}", f"password={read_secret(config.password_file, config.password_env)}",
             f"host={host}", f"port={port}", "protocol=TCP"]
    if config.tls_ca_file is not None:
        lines += [f"ssl-ca={config.tls_ca_file}", "ssl-verify-server-cert"]
    fd, name = tempfile.mkstemp(prefix="hapki-db-", suffix=".cnf")
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp made it 0600
            fh.write("\n".join(lines) + "\n")
        yield Path(name)
    finally:
        os.unlink(name)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupRefused(f"{name} not found (Debian package mariadb-client)")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dump(config: DatabaseConfig, node: str, out: Path, *, schema: int) -> Manifest:
    """`mariadb-dump` of the configured database on `node` into `out` (gzip, 0600 from its creation: the site's
    data), and its manifest beside it; `created_at` is when the dump began (its snapshot is no older). BackupRefused
    (and no file) when the dump or the writing fails."""
    tool = _tool("mariadb-dump")
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    partial = out.with_name(out.name + ".partial")
    proc: subprocess.Popen[bytes] | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        began = datetime.now(UTC)
        with client_defaults(config, node) as defaults, tempfile.TemporaryFile() as errors, \
                os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as raw:
            # --defaults-extra-file must be the first option.
            proc = subprocess.Popen([tool, f"--defaults-extra-file={defaults}", *DUMP_OPTIONS, config.database],
                                    stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as sink:
                while chunk := proc.stdout.read(CHUNK):
                    sink.write(chunk)
            code = proc.wait(TOOL_TIMEOUT_SECONDS)
            errors.seek(0)
            said = errors.read().decode(errors="replace").strip()
        if code != 0:
            raise BackupRefused(f"mariadb-dump of {config.database} on {node} failed ({code}): {said[-1500:]}")
        partial.replace(out)
        manifest = Manifest(format=FORMAT, created_at=began.isoformat(), node=node, database=config.database,
                            schema_version=schema, sha256=_sha256(out), bytes=out.stat().st_size, tool=version)
        manifest_path(out).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    except OSError as exc:  # a full disk, a directory it may not write: nothing is left behind
        _remove(partial)
        raise BackupRefused(f"writing the backup {out} failed: {exc}") from exc
    except BaseException:
        _remove(partial)
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    return manifest


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # not there, or never creatable (its directory is not one)
        path.unlink(missing_ok=True)


def check(backup: Path) -> Manifest:
    """The backup's manifest, once the file is the one it names (size and SHA-256); BackupRefused otherwise."""
    manifest = Manifest.read(manifest_path(backup))
    if manifest.format != FORMAT:
        raise BackupRefused(f"{backup}: format {manifest.format!r}, this hapki reads {FORMAT!r}")
    try:
        size = backup.stat().st_size
    except FileNotFoundError as exc:
        raise BackupRefused(f"no backup file {backup}") from exc
    if size != manifest.bytes or _sha256(backup) != manifest.sha256:
        raise BackupRefused(f"{backup} is not the file its manifest names (size {size}, manifest {manifest.bytes}; "
                            "or its SHA-256 differs): altered or truncated")
    return manifest


def restore(config: DatabaseConfig, node: str, backup: Path) -> None:
    """Load `backup` into the configured database on `node` with the `mariadb` client (its tables are dropped and
    created again from the file). The caller checked the file and the target first."""
    tool = _tool("mariadb")
    with client_defaults(config, node) as defaults, tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([tool, f"--defaults-extra-file={defaults}", "--batch", config.database],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        assert proc.stdin is not None
        try:
            with gzip.open(backup, "rb") as source:
                while chunk := source.read(CHUNK):
                    proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the client stopped reading: its exit status and stderr say why
        except OSError as exc:  # the file cannot be read (checked just before: it went away, a disk error)
            proc.kill()
            proc.wait()
            raise BackupRefused(f"reading {backup} failed: {exc}; nothing was committed") from exc
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        code = proc.wait(TOOL_TIMEOUT_SECONDS)
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip()
    if code != 0:
        raise BackupRefused(f"loading {backup} into {config.database} on {node} failed ({code}): {said[-1500:]}")
