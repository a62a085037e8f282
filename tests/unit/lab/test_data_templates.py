"""The Galera and NATS configs rendered from the lab's templates pass their own tools' syntax checks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hapki.lab.data import GaleraNode, NatsClusterNode
from hapki.lab.local import _nats_binary


def test_nats_config_passes_nats_server_t(tmp_path: Path) -> None:
    node = NatsClusterNode(tmp_path, "nats-1", "10.213.3.31", ["10.213.3.31:6222", "10.213.3.32:6222"])
    conf = tmp_path / "nats.conf"
    conf.write_text(node._conf())  # noqa: SLF001 - the rendered text is what is checked
    result = subprocess.run([_nats_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    # -t parses the whole file, then tries to bind: refusing the (not local) address means the syntax was fine
    assert result.returncode == 0 or "cannot assign requested address" in result.stderr, result.stderr
    assert '"nats-route://10.213.3.32:6222"' in conf.read_text()


def test_nats_node_runs_with_gomaxprocs_only_when_asked(tmp_path: Path) -> None:
    plain = NatsClusterNode(tmp_path, "nats-1", "10.213.3.31", [], netns="hapki-nats-1")
    limited = NatsClusterNode(tmp_path, "nats-1", "10.213.3.31", [], netns="hapki-nats-1", gomaxprocs=1)
    binary = _nats_binary()
    assert plain._argv() == ["ip", "netns", "exec", "hapki-nats-1", binary, "--config", str(plain.conf_path)]  # noqa: SLF001
    # env(1) execs the server: the PID the lab tracks (and the pid file's) stays nats-server's
    assert limited._argv() == ["ip", "netns", "exec", "hapki-nats-1", "env", "GOMAXPROCS=1", binary,  # noqa: SLF001
                               "--config", str(limited.conf_path)]


@pytest.mark.skipif(shutil.which("mariadbd") is None, reason="mariadb-server is not installed")
def test_galera_config_is_accepted_by_mariadbd(tmp_path: Path) -> None:
    node = GaleraNode(tmp_path, "db-1", "10.213.3.21", ["10.213.3.21:4567", "10.213.3.22:4567"])
    cnf = tmp_path / "my.cnf"
    cnf.write_text(node._cnf())  # noqa: SLF001
    result = subprocess.run(["mariadbd", f"--defaults-file={cnf}", "--help", "--verbose"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    values = dict(line.split(None, 1) for line in result.stdout.splitlines()
                  if line.startswith("wsrep-") and len(line.split(None, 1)) == 2)
    assert values["wsrep-cluster-address"].strip() == "gcomm://10.213.3.21:4567,10.213.3.22:4567"
    assert values["wsrep-node-name"].strip() == "db-1"


def test_secured_nats_config_passes_nats_server_t(tmp_path: Path) -> None:
    from hapki.lab import tls
    from hapki.lab.local import BusUsers, TlsFiles

    tls.create_infra_ca(tmp_path / "tls")
    users = BusUsers(tmp_path / "secrets")
    node = NatsClusterNode(tmp_path, "nats-1", "10.213.3.31", ["10.213.3.31:6222", "10.213.3.32:6222"])
    node.accounts = users.accounts_conf()
    node.tls = TlsFiles.issue(tmp_path / "tls", "nats-1", ["10.213.3.31"], client_auth=True)
    conf = tmp_path / "nats.conf"
    conf.write_text(node._conf())  # noqa: SLF001
    result = subprocess.run([_nats_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 or "cannot assign requested address" in result.stderr, result.stderr
    text = conf.read_text()
    assert '"verify": true' in text and "allow_responses" in text
    for user, *_ in BusUsers.DEFAULT:  # every password only in its 0600 file; the server's config has its hash
        assert users.password_file(user).stat().st_mode & 0o777 == 0o600
        assert users.password_file(user).read_text().strip() not in text


def test_galera_state_transfer_is_tls_with_the_members_certificates_only(tmp_path: Path) -> None:
    from hapki.lab import tls
    from hapki.lab.data import GaleraCluster
    from hapki.lab.local import TlsFiles

    tls.create_infra_ca(tmp_path / "tls")
    addresses = {"db-1": "10.213.3.21", "db-2": "10.213.3.22"}
    nodes = [GaleraNode(tmp_path, name, address, list(addresses.values())) for name, address in addresses.items()]
    GaleraCluster(tmp_path, nodes, tls=lambda n: TlsFiles.issue(tmp_path / "tls", n.name, [n.address],
                                                                client_auth=True))
    sst = nodes[0]._cnf().split("[sst]", 1)[1]  # noqa: SLF001
    values = dict(line.split("=", 1) for line in sst.splitlines() if "=" in line and not line.startswith("#"))
    # VERIFY_IDENTITY: stunnel's verifyPeer (only certificates in tca) plus the donor's check of the joiner's address.
    assert values["ssl-mode"] == "VERIFY_IDENTITY"
    assert values["tcert"].endswith("db-1.crt") and values["tkey"].endswith("db-1.key")
    peers = Path(values["tca"]).read_text()
    members = [Path(tmp_path / "tls" / f"{name}.crt").read_text().split("-----END CERTIFICATE-----")[0]
               for name in addresses]
    assert all(member in peers for member in members)
    assert peers.count("BEGIN CERTIFICATE") == 1 + 2 * 2  # the CA, then each member's file (leaf and CA)
