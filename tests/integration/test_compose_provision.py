"""The Compose demo's provisioner (`hapki compose provision`) against real MariaDB, NATS and SoftHSM (a LocalEnv):
database users and grants over the server's root socket, the JetStream streams as the bus admin, `hapki ca init`.
Run twice, as `docker compose up` does on every start: the second run changes nothing and succeeds."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import nats
import pytest

from hapki.contracts import subjects
from hapki.lab import stack
from hapki.lab.compose_init import provision
from hapki.lab.local import LocalEnv
from hapki.lab.topology import default

pytestmark = pytest.mark.integration


async def _streams(env: LocalEnv) -> dict[str, int]:
    nc = await nats.connect(**env.nats.connect_kwargs("admin"))
    try:
        js = nc.jetstream(timeout=5)
        return {name: (await js.stream_info(name)).config.num_replicas or 1
                for name in (subjects.SIGNING_STREAM, subjects.HA_EVENTS_STREAM, subjects.EXPIRY_STREAM)}
    finally:
        await nc.close()


def test_provision_creates_users_streams_and_the_ca_and_can_run_again(tmp_path: Path) -> None:
    env = LocalEnv(tmp_path / "env").start()
    try:
        secrets = tmp_path / "secrets"  # what the provision container's own secrets directory holds
        secrets.mkdir()
        for user in ("hapki", "hapki_cara", "hapki_clm"):
            shutil.copy(env.db.password_file_for(user), secrets / f"{user}.password")
        cara = stack.write_config(stack.cara_config(env), tmp_path / "cara.toml")
        run = lambda: provision(default(), secrets, env.db.socket, cara, tmp_path / "no-hsm-volumes",  # noqa: E731
                                nats=env.nats.nats_config("admin"))
        run()
        assert "BEGIN CERTIFICATE" in (secrets / "root.pem").read_text()
        grants = env.db.sql("SHOW GRANTS FOR 'hapki_cara'@'%'")
        assert "`hapki`.`signing_intents`" in grants and "ALL PRIVILEGES" not in grants
        assert "REQUIRE SSL" in env.db.sql("SHOW CREATE USER 'hapki_clm'@'%'")
        assert env.db.sql("SELECT COUNT(*) FROM hapki.issuers").split() == ["1"]
        assert set(asyncio.run(_streams(env))) == {subjects.SIGNING_STREAM, subjects.HA_EVENTS_STREAM,
                                                   subjects.EXPIRY_STREAM}
        root = (secrets / "root.pem").read_text()
        run()  # idempotent: same CA, no second issuer
        assert (secrets / "root.pem").read_text() == root
        assert env.db.sql("SELECT COUNT(*) FROM hapki.issuers").split() == ["1"]
    finally:
        env.stop()
