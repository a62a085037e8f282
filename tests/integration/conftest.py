"""Real components for integration tests: one LocalEnv (NATS, MariaDB, SoftHSM) and an initialised CA per module,
and CARA + CLM running in-process against them (so spans land in the in-memory exporter)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import pytest

from hapki.cara.config import CaraConfig
from hapki.cara.main import CaraRuntime
from hapki.cli.client import ClmClient
from hapki.clm.config import ClmConfig
from hapki.clm.main import ClmRuntime
from hapki.clm.store import MariaDBRequestStore
from hapki.contracts.models import IssueCertificate, IssueReply
from hapki.lab import stack
from hapki.lab.local import LocalEnv
from hapki.runtime.db import Database
from helpers.csr import make_csr, make_key
from telemetry_fixture import memory_exporter


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    base = tmp_path_factory.mktemp("env")
    local = LocalEnv(base).start()
    cara_path = stack.write_config(stack.cara_config(local), base / "cara.toml")
    subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(cara_path), "--out", str(base)],
                   check=True, capture_output=True, timeout=120, env={**os.environ})
    try:
        yield local
    finally:
        local.stop()


@contextlib.asynccontextmanager
async def running(cara_config: CaraConfig, clm_config: ClmConfig) -> AsyncIterator[tuple[CaraRuntime, ClmRuntime]]:
    """CARA and CLM started in this process (so spans land in the in-memory exporter), stopped after."""
    memory_exporter()  # the SDK provider must exist before the runtimes create their tracers' spans
    cara, clm = CaraRuntime(cara_config), ClmRuntime(clm_config)
    await cara.start()
    await clm.start()
    try:
        yield cara, clm
    finally:
        await clm.stop()
        await cara.stop()


def http_url(runner: Any) -> str:
    """The base URL of a runtime's HTTP edge (its aiohttp runner, listening on an ephemeral port)."""
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
async def services(env: LocalEnv) -> AsyncIterator[tuple[CaraRuntime, ClmRuntime]]:
    async with running(stack.cara_config(env), stack.clm_config(env, wait_seconds=10.0)) as pair:
        yield pair


@pytest.fixture(scope="module")
async def clm_store(env: LocalEnv) -> AsyncIterator[MariaDBRequestStore]:
    """CLM's request store on its own database user, for tests that record requests as CLM does."""
    db = Database(stack.clm_config(env).database)
    try:
        yield MariaDBRequestStore(db)
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def connected_client(env: LocalEnv) -> AsyncIterator[ClmClient]:
    """A CLM NATS client on the env's server, closed afterwards (modules with their own runtimes use it too)."""
    c = await ClmClient.connect(stack.nats_config(env, "client"), timeout=15.0)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def client(env: LocalEnv, services: object) -> AsyncIterator[ClmClient]:
    async with connected_client(env) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def issue_server_certificate(client: ClmClient, name: str, requester: str) -> IssueReply:
    """A tls-server certificate for `name` (a fresh P-256 key), issued; its reply."""
    csr_pem, _ = make_csr([name], key=make_key("p256", fresh=True), cn=name)
    reply = await client.issue(IssueCertificate(csr_pem=csr_pem, profile="tls-server", requester=requester,
                                                idempotency_key=uuid.uuid4().hex))
    assert reply.error is None and reply.serial, reply
    return reply


@pytest.fixture
async def sql(env: LocalEnv) -> AsyncIterator[aiomysql.Connection]:
    """A direct connection for assertions on rows (autocommit, fresh reads)."""
    conn = await aiomysql.connect(**env.db.connect_kwargs(), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def own_statements(*, with_values: bool = False) -> Iterator[list[str]]:
    """The SQL the calling task sends meanwhile, one entry per Cursor.execute (a round trip); not the services'
    own background work in this process (the audit sealer, say). `with_values`: with the arguments in it, as the
    server got it (to run it again under ANALYZE)."""
    statements: list[str] = []
    execute, caller = aiomysql.Cursor.execute, asyncio.current_task()

    async def counted(self: aiomysql.Cursor, query: str, args: object = None) -> int:
        if asyncio.current_task() is caller:
            statements.append(self.mogrify(query, args) if with_values else query)
        return await execute(self, query, args)

    aiomysql.Cursor.execute = counted  # type: ignore[method-assign]
    try:
        yield statements
    finally:
        aiomysql.Cursor.execute = execute  # type: ignore[method-assign]


async def query(conn: aiomysql.Connection, statement: str, args: object = None) -> list[tuple]:
    async with conn.cursor() as cur:
        await cur.execute(statement, args)
        return list(await cur.fetchall())


def chain_files(tmp: Path, cert_pem: str, chain_pem: str) -> tuple[Path, Path, Path]:
    """cert.pem, untrusted intermediates and root as separate files for `openssl verify`."""
    certs = [c + "-----END CERTIFICATE-----\n" for c in chain_pem.split("-----END CERTIFICATE-----") if c.strip()]
    leaf, inter, root = tmp / "leaf.pem", tmp / "inter.pem", tmp / "root.pem"
    leaf.write_text(cert_pem)
    inter.write_text("".join(certs[:-1]))
    root.write_text(certs[-1])
    return leaf, inter, root
