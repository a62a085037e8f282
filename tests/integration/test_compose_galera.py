"""The Compose demo's Galera bootstrap, for real, without Docker: the image's entrypoint and health check scripts
run on this host as the OS user mysql with db-1's rendered galera.cnf (its container paths and addresses moved
to a private directory and loopback ports), then the provisioner's SQL over the root socket.

What this proves about the demo: the bootstrap node initialises an empty datadir and starts a new cluster as a
non-root user; the health check logs in as mysql over the socket and sees Synced; root (uid 0, as the provision
container runs) logs in over the same socket and creates the users and grants the services need; the node requires
TLS from TCP clients with the certificate `hapki compose init` made for it; a restart with data joins (no new
cluster) unless grastate.dat says safe_to_bootstrap.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hapki.lab import compose
from hapki.lab.compose_init import _socket_sql, init_secrets
from hapki.lab.data import provision_database
from hapki.lab.local import _stop_child, free_port
from hapki.lab.topology import default

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("mariadbd") is None, reason="mariadb-server is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs the node as the OS user mysql (needs root)"),
]

IMAGES = compose.COMPOSE_DIR / "images" / "galera"


@pytest.fixture
def node_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is private to root, and the node runs as mysql.
    path = Path(tempfile.mkdtemp(prefix="hapki-compose-galera-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Each node on its own loopback address (all of 127/8 is local), so the members can use the same ports as in the demo.
LOOPBACK = {"db-1": "127.0.2.21", "db-2": "127.0.2.22", "db-3": "127.0.2.23"}


def _init(base: Path) -> None:
    """`hapki compose init` into base/secrets, the db members' directories given to mysql as the demo's init does."""
    init_secrets(default(), base / "secrets", base / "hsm", chown=False)
    mysql = pwd.getpwnam("mysql")
    for member in default().members_by_role("db"):
        for path in [base / "secrets" / member, *(base / "secrets" / member).iterdir()]:
            os.chown(path, mysql.pw_uid, mysql.pw_gid)
    (base / "secrets").chmod(0o755)


def _layout(base: Path, member: str, ports: dict[int, int]) -> tuple[Path, dict[str, str]]:
    """``member``'s rendered galera.cnf with its container paths moved under base/<member>, its addresses to
    LOOPBACK and the container ports to ``ports``; the environment for the image's scripts."""
    topo = default()
    home = base / member
    mysql = pwd.getpwnam("mysql")
    for d in (home, home / "data", home / "run"):
        d.mkdir()
        os.chown(d, mysql.pw_uid, mysql.pw_gid)
    home.chmod(0o755)
    p = topo.ports
    text = (compose.COMPOSE_DIR / "rendered" / member / "galera.cnf").read_text()
    text = text.replace(str(compose.SECRETS), str(base / "secrets" / member))
    text = text.replace("datadir=/var/lib/mysql", f"datadir={home / 'data'}")
    text = text.replace(str(compose.MYSQL_RUN), str(home / "run"))
    for db in topo.members_by_role("db"):
        text = text.replace(str(topo.address(db)), LOOPBACK[db])
    text = text.replace(f"port={p.mariadb}\n", f"port={ports[p.mariadb]}\n")
    for container_port in (p.galera, p.ist, p.sst):
        text = text.replace(f":{container_port}", f":{ports[container_port]}")
    cnf = home / "galera.cnf"
    cnf.write_text(text)
    cnf.chmod(0o644)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "GALERA_CNF": str(cnf),
           "GALERA_DATADIR": str(home / "data"), "GALERA_SOCKET": str(home / "run" / "mysqld.sock")}
    return cnf, env


def _ports() -> dict[int, int]:
    p = default().ports
    return {p.mariadb: free_port(), p.galera: free_port(), p.ist: free_port(), p.sst: free_port()}


def _as_mysql(script: str, env: dict[str, str]) -> list[str]:
    return ["setpriv", "--reuid=mysql", "--regid=mysql", "--init-groups", "env",
            *(f"{k}={v}" for k, v in env.items()), "sh", str(IMAGES / script)]


LAST_CHECK: dict[str, str] = {}


def _healthy(env: dict[str, str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        check = subprocess.run(_as_mysql("healthcheck.sh", env), capture_output=True, text=True, timeout=30)
        LAST_CHECK["output"] = check.stdout + check.stderr
        if check.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _why(log: Path) -> str:
    return f"last health check: {LAST_CHECK.get('output', '')!r}\nserver log:\n{log.read_text()[-3000:]}"


def _start(env: dict[str, str], bootstrap: bool, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(_as_mysql("entrypoint.sh", {**env, "GALERA_BOOTSTRAP": "1" if bootstrap else "0"}),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    _stop_child(proc, 60)


def test_db1_bootstraps_as_mysql_is_healthy_and_provisions_over_the_root_socket(node_dir: Path) -> None:
    _init(node_dir)
    cnf, env = _layout(node_dir, "db-1", _ports())
    log = node_dir / "mariadbd.log"
    assert not _healthy(env, 0.1)  # nothing runs yet: the check can fail
    proc = _start(env, bootstrap=True, log=log)
    try:
        # Generous: on a loaded 2-core host a fresh datadir plus the bootstrap took up to a minute.
        assert _healthy(env, 180), _why(log)
        assert pwd.getpwuid((node_dir / "db-1" / "data" / "mysql").stat().st_uid).pw_name == "mysql"
        secrets = node_dir / "secrets" / "provision"
        passwords = {u: (secrets / f"{u}.password").read_text().strip() for u in ("hapki", "hapki_cara", "hapki_clm")}
        run_sql = _socket_sql(Path(env["GALERA_SOCKET"]))  # as root (uid 0), like the provision container
        provision_database(run_sql, "hapki", "hapki", passwords, require_ssl=True)
        grants = run_sql("SHOW GRANTS FOR 'hapki_cara'@'%'")
        assert "REQUIRE SSL" in run_sql("SHOW CREATE USER 'hapki_cara'@'%'")
        assert "`hapki`.`signing_intents`" in grants and "ALL PRIVILEGES" not in grants
        # A TCP client needs TLS with the node's certificate from `hapki compose init`.
        port = next(line.split("=")[1] for line in cnf.read_text().splitlines() if line.startswith("port="))
        ca = node_dir / "secrets" / "provision" / "infra-ca.pem"
        base = ["mariadb", "--no-defaults", "-h", LOOPBACK["db-1"], "-P", port, "-u", "hapki_cara", "--batch",
                "--skip-column-names", "-e", "SELECT CURRENT_USER()"]
        plain = subprocess.run([*base, "--skip-ssl"], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "MYSQL_PWD": passwords["hapki_cara"]})
        assert plain.returncode != 0
        # (The certificate names db-1's demo address, not the loopback address used here: no host name check.)
        secure = subprocess.run([*base, "--ssl", f"--ssl-ca={ca}"], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "MYSQL_PWD": passwords["hapki_cara"]})
        assert secure.returncode == 0 and "hapki_cara@%" in secure.stdout, secure.stderr
    finally:
        _stop(proc)
    # Stopped cleanly as the last node: it may bootstrap again; without that mark it would try to join instead.
    assert "safe_to_bootstrap: 1" in (node_dir / "db-1" / "data" / "grastate.dat").read_text()
    proc = _start(env, bootstrap=True, log=log)
    try:
        assert _healthy(env, 180), _why(log)
    finally:
        _stop(proc)


def test_db2_joins_by_state_transfer_over_tls_with_the_init_certificates(node_dir: Path) -> None:
    """The demo's SST: db-2 starts empty and gets db-1's data by rsync through stunnel, each end pinned to the
    members' certificates `hapki compose init` made (galera-sst-peers.pem), the donor checking the joiner's
    certificate names it. As the OS user mysql, with the image's entrypoint and health check."""
    _init(node_dir)
    ports = _ports()
    (_, env1), (_, env2) = _layout(node_dir, "db-1", ports), _layout(node_dir, "db-2", ports)
    first = _start(env1, bootstrap=True, log=node_dir / "db-1.log")
    second = None
    try:
        assert _healthy(env1, 180), _why(node_dir / "db-1.log")
        run_sql = _socket_sql(Path(env1["GALERA_SOCKET"]))
        marker = f"compose-sst-{os.getpid()}"
        run_sql(f"CREATE DATABASE demo; CREATE TABLE demo.t (v VARCHAR(64) PRIMARY KEY); "
                f"INSERT INTO demo.t VALUES ('{marker}')")
        second = _start(env2, bootstrap=False, log=node_dir / "db-2.log")
        assert _healthy(env2, 180), _why(node_dir / "db-2.log")
        joined = (node_dir / "db-2.log").read_text(errors="replace")
        assert "rsync SST completed on joiner" in joined, joined[-3000:]
        assert "Using stunnel for SSL encryption" in joined and "ssl-mode='VERIFY_IDENTITY'" in joined
        assert marker in _socket_sql(Path(env2["GALERA_SOCKET"]))("SELECT v FROM demo.t")
        assert "Subject checks failed" not in (node_dir / "db-1.log").read_text(errors="replace")
    finally:
        if second is not None:
            _stop(second)
        _stop(first)
