"""Integration tests of hapki.lab.local: the real NATS, MariaDB and SoftHSM2 come up, serve and survive a crash."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiomysql
import nats
import pkcs11
import pytest

from hapki.lab.local import LocalEnv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    """One LocalEnv shared by the tests that only use it (start costs about a second)."""
    with LocalEnv(tmp_path_factory.mktemp("lab")) as started:
        yield started


def _gone(pid: int) -> bool:
    """True if no live (non-zombie) process has this PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _check_nats(env: LocalEnv, stream: str) -> None:
    nc = await nats.connect(**env.nats.connect_kwargs(), connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        ack = await js.publish(f"{stream.lower()}.hello", b"hi")
        assert ack.stream == stream
        assert ack.seq >= 1
    finally:
        await nc.close()


async def _check_db(env: LocalEnv) -> None:
    conn = await aiomysql.connect(**env.db.connect_kwargs(), connect_timeout=5)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
    finally:
        conn.close()


async def test_nats_jetstream_publish_is_acked(env: LocalEnv) -> None:
    assert env.nats.url == f"nats://127.0.0.1:{env.nats.port}"
    await _check_nats(env, "LABCHECK")


async def test_mariadb_accepts_the_app_user(env: LocalEnv) -> None:
    assert env.db.password_file.stat().st_mode & 0o777 == 0o600
    await _check_db(env)
    assert env.db.sql("SELECT @@character_set_server, @@max_connections").split() == ["utf8mb4", "300"]


def test_softhsm_token_opens_with_the_pin_file(env: LocalEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = env.hsm.pin_file("hapki-a")
    assert pin_file.stat().st_mode & 0o777 == 0o600
    # SoftHSM reads SOFTHSM2_CONF when the library initialises, so it must be in place before pkcs11.lib().
    monkeypatch.setenv("SOFTHSM2_CONF", str(env.hsm.conf_path))
    lib = pkcs11.lib(env.hsm.module_path)
    try:
        token = lib.get_token(token_label="hapki-a")
        with token.open(user_pin=pin_file.read_text().strip()) as session:
            assert list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})) == []
    finally:
        # Let later tests load the library again with their own SOFTHSM2_CONF.
        lib.finalize()


async def test_env_comes_back_after_sigkill_on_the_same_dir(tmp_path: Path) -> None:
    first = LocalEnv(tmp_path).start()
    pids = [first.nats.pid, first.db.pid]
    assert all(pids)
    await _check_nats(first, "BEFORE")
    first.kill()
    assert all(_gone(pid) for pid in pids if pid)
    # Leftovers of the crash are still there: pid files, the MariaDB socket, a JetStream store.
    assert first.nats.pid_file.exists()

    with LocalEnv(tmp_path) as second:
        await _check_nats(second, "AFTER")
        await _check_db(second)
        assert second.hsm.pin_file("hapki-a").read_text() == first.hsm.pin_file("hapki-a").read_text()
        live = [second.nats.pid, second.db.pid]
    assert all(_gone(pid) for pid in live if pid)


def test_stop_after_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    env = LocalEnv(tmp_path)
    env.db.options["no-such-option"] = "1"  # mariadbd refuses unknown options
    with pytest.raises(RuntimeError, match="no-such-option"):
        env.start()
    assert not env.nats.running
    assert not env.db.running
    env.stop()  # tolerated twice

