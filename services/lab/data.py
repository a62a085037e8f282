"""The lab's data tier as real clusters: three MariaDB Galera nodes and three NATS servers with JetStream.

Each node keeps its files in ``base_dir/<name>/`` and may run inside a Linux network namespace (``netns``): its
process is started as ``ip netns exec NS <server> ...``, which execs the server, so the PID we track is the
server's own. Process handling (own session, PID tracking, stop by PID, atexit, cleanup of leftovers of a killed
earlier run) is shared with the single-node starters in :mod:`hapki.lab.local`.

Usage (the tests run this on loopback addresses, the lab on the data segment)::

    db = GaleraCluster(base, [GaleraNode(base, f"db-{i}", f"10.213.3.2{i}", peers) for i in (1, 2, 3)])
    db.start()          # node 1 bootstraps, the others join by rsync SST; database and users created
    db.password_file("hapki_clm")
    bus = NatsCluster(base, [NatsClusterNode(base, f"nats-{i}", f"10.213.3.3{i}", routes) for i in (1, 2, 3)])
    bus.start()         # all at once; returns when JetStream has a meta leader
    bus.urls

Galera facts this relies on (FIELD-NOTES): a killed node restarts without a full SST only when started at its
recovered position (``--wsrep-recover``, then ``--wsrep-start-position``); after all nodes died, the one with the
highest seqno must be marked ``safe_to_bootstrap: 1`` and bootstrapped. The evs timeouts are left at their defaults
(shortening them made the whole cluster lose Primary on two cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

from hapki.lab.local import (
    _MAX_SOCKET_PATH,
    BusUsers,
    TlsFiles,
    _nats_binary,
    _reap_stale,
    _Server,
    _tail,
    _write_secret,
    install_datadir,
)
from hapki.lab import render
from hapki.runtime import grants

__all__ = ["GaleraCluster", "GaleraNode", "NatsCluster", "NatsClusterNode", "netns_prefix", "new_password",
           "provision_database"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SST_METHOD = "hapki_rsync"  # rsync SST with a root receiver (see GaleraNode._write_sst_scripts)


def netns_prefix(netns: str | None) -> list[str]:
    """The argv prefix that runs a command inside network namespace ``netns`` (empty for the host's)."""
    return ["ip", "netns", "exec", netns] if netns else []


def _poll(what: str, check: Callable[[], _T | None], timeout: float, interval: float = 0.1) -> _T:
    """Call ``check`` until it returns something other than None/False; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


def _all(fn: Callable[[_T], Any], items: Sequence[_T]) -> None:
    """Run ``fn`` on every item concurrently; re-raise the first error after all have finished."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="lab-data") as pool:
        futures = [pool.submit(fn, item) for item in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------
# MariaDB Galera
# ---------------------------------------------------------------------------------------------------------------

_RECOVERED = re.compile(r"WSREP: Recovered position:\s*(\S+)")
_POSITION = re.compile(r"^([0-9a-f-]{36}):(-?\d+)")
_STATUS_KEYS = (
    "wsrep_ready",
    "wsrep_cluster_size",
    "wsrep_local_state_comment",
    "wsrep_cluster_status",
    "wsrep_last_committed",
)


def _seqno(position: str) -> int:
    """The seqno of a Galera position ``uuid:seqno[,gtid]`` (-1 if unparsable)."""
    m = _POSITION.match(position)
    return int(m.group(2)) if m else -1


def new_password() -> str:
    """A random database password: URL-safe, so it needs no quoting in SQL or DSNs."""
    return secrets.token_urlsafe(24)


def provision_database(run_sql: Callable[[str], str], database: str, admin: str, passwords: Mapping[str, str], *,
                       require_ssl: bool) -> None:
    """Create the database and its users (``{user: password}``, all ``@'%'``, TLS required if asked), give the admin
    ALL on ``<database>%``.*, then apply the migrations and the service users' grants (hapki.runtime.grants).

    ``run_sql`` runs a script as the server's root (the ``mariadb`` client on its socket). Used by the lab's
    bootstrap and by the Compose demo's provisioner, so both end with the same users and privileges.
    """
    statements = [f"CREATE DATABASE IF NOT EXISTS `{database}`"]
    for user, password in passwords.items():
        account = f"'{user}'@'%'"
        statements += [
            f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY '{password}'",
            f"ALTER USER {account} IDENTIFIED BY '{password}'" + (" REQUIRE SSL" if require_ssl else ""),
        ]
    statements.append(f"GRANT ALL PRIVILEGES ON `{database}%`.* TO '{admin}'@'%'")
    run_sql(";\n".join(statements) + ";")
    grants.provision(run_sql, database, {u: [f"'{u}'@'%'"] for u in grants.SERVICE_USERS})


class GaleraNode(_Server):
    """One mariadbd of a Galera cluster, with its datadir, my.cnf, socket, pid file and log in ``base_dir/<name>/``.

    ``peers`` are the members' Galera addresses (``host`` or ``host:port``) for ``gcomm://``. Only a bootstrapping
    node with an empty datadir is initialised with ``mariadb-install-db``; joiners receive their data by rsync SST
    (or IST when they restart at their recovered position). MariaDB runs as root, as in :mod:`hapki.lab.local`.
    """

    kind = "galera node"
    start_timeout = 120.0  # includes a joiner's SST
    stop_timeout = 60.0

    def __init__(
        self,
        base_dir: Path,
        name: str,
        address: str,
        peers: list[str],
        *,
        netns: str | None = None,
        port: int = 3306,
        galera_port: int = 4567,
        ist_port: int = 4568,
        sst_port: int = 4444,
    ) -> None:
        super().__init__(base_dir, name, port)
        self.address = address
        self.peers = list(peers)
        self.netns = netns
        self.galera_port = galera_port
        self.ist_port = ist_port
        self.sst_port = sst_port
        self.datadir = self.dir / "data"
        self.cnf_path = self.dir / "my.cnf"
        self.pid_file = self.dir / "mariadbd.pid"
        self._bin_dir = self.dir / "bin"
        sock = self.dir / "mariadbd.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            # Derived from our directory, so a later run on the same base_dir finds (and cleans) the same path.
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
            sock = Path("/tmp") / f"hapki-lab-{digest}" / "mariadbd.sock"
        self.socket = sock
        self._extra_args: list[str] = []
        self.tls: Callable[[], TlsFiles] | None = None  # set by GaleraCluster: this node's TLS files, at each start
        self.sst_peers: Callable[[], Path | None] = lambda: None  # GaleraCluster(sst_tls=True): the members' certificates
        self.last_start_offset = 0  # byte offset of the log where the last start began (see joined_by())

    # -- configuration -----------------------------------------------------------------------------------------

    def _cnf(self) -> str:
        return render.galera_cnf(
            name=self.name, address=self.address, peers=self.peers, datadir=self.datadir, socket=self.socket,
            pid_file=self.pid_file, port=self.port, galera_port=self.galera_port, ist_port=self.ist_port,
            sst_port=self.sst_port, sst_method=_SST_METHOD, log_path=self.log_path,
            tls=self.tls() if self.tls is not None else None,
            sst_peers=self.sst_peers(),
        )

    def _prepare(self) -> None:
        _reap_stale(self.pid_file, str(self.cnf_path))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.cnf_path.write_text(self._cnf())
        self.datadir.mkdir(exist_ok=True)
        self._write_sst_scripts()

    def _write_sst_scripts(self) -> None:
        """Install the SST method ``hapki_rsync``: Debian's rsync SST with its receiver kept root.

        mariadbd runs as root (see hapki.lab.local), and an rsync daemon started by root switches to ``nobody``
        unless its config says otherwise; wsrep_sst_rsync writes that config itself, so a joiner's SST fails with
        "Permission denied" in the root-owned datadir. An ``rsync`` wrapper that adds ``--dparam=uid=root`` cannot
        simply go first on PATH: mariadbd puts its own bin directory in front before running the SST script. So
        ``wsrep_sst_hapki_rsync`` (a custom method is looked up on PATH as ``wsrep_sst_<method>``) puts the
        wrapper first and runs the stock script unchanged.
        """
        real_rsync, real_sst = shutil.which("rsync"), shutil.which("wsrep_sst_rsync")
        if real_rsync is None or real_sst is None:
            raise RuntimeError("rsync or wsrep_sst_rsync not found: apt-get install rsync mariadb-server")
        self._bin_dir.mkdir(exist_ok=True)
        scripts = {
            "rsync": (
                f'case " $* " in *" --daemon "*) exec {real_rsync} --dparam=uid=root --dparam=gid=root "$@" ;; esac\n'
                f'exec {real_rsync} "$@"\n'
            ),
            f"wsrep_sst_{_SST_METHOD}": f'PATH="{self._bin_dir}:$PATH" exec {real_sst} "$@"\n',
        }
        for name, body in scripts.items():
            path = self._bin_dir / name
            path.write_text(f"#!/bin/sh\n# Written by hapki.lab.data (see GaleraNode._write_sst_scripts).\n{body}")
            path.chmod(0o755)

    def _install(self) -> None:
        """Initialise an empty datadir (bootstrap node only); root logs in over the socket as OS user root."""
        shutil.rmtree(self.datadir, ignore_errors=True)
        result = install_datadir(self.cnf_path, self.datadir)
        if result.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({result.returncode}): {result.stderr.strip()[-1000:]}\n"
                f"tail of {self.log_path}:\n{_tail(self.log_path)}"
            )

    def has_state(self) -> bool:
        """True if the datadir holds a database (from an install, an SST or an earlier run)."""
        return (self.datadir / "mysql").is_dir()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        # env(1) execs mariadbd, so the PID we track stays the server's; PATH finds our SST method.
        path = f"PATH={self._bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return [
            *netns_prefix(self.netns), "env", path,
            "mariadbd", f"--defaults-file={self.cnf_path}", *self._extra_args,
        ]  # fmt: skip

    def _ready(self) -> bool:
        # The server sends its handshake once it accepts connections (a joiner only after its SST). A pathname
        # unix socket is reachable from any network namespace, so this works for a node in a netns too.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(str(self.socket))
                return bool(s.recv(64))
        except OSError:
            return False

    def start(self, bootstrap: bool = False, start_position: str | None = None) -> None:  # type: ignore[override]
        """Start mariadbd and wait until it accepts connections (a joiner: after SST/IST); see wait_synced().

        ``bootstrap`` starts a new cluster (``--wsrep-new-cluster``) and initialises an empty datadir first.
        ``start_position`` (``uuid:seqno`` from ``--wsrep-recover``) lets a restarted node ask for IST.
        """
        if self.running:
            return
        self._prepare()
        if bootstrap and not self.has_state():
            self._install()
        self._extra_args = []
        if bootstrap:
            self._extra_args.append("--wsrep-new-cluster")
        if start_position:
            self._extra_args.append(f"--wsrep-start-position={start_position}")
        self.last_start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._launch_and_wait()

    def wait_synced(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the node is ``Synced`` and ``wsrep_ready=ON``; return its status. RuntimeError if it died."""

        def synced() -> dict[str, Any] | None:
            if not self.running:
                raise RuntimeError(self._failure("exited while joining"))
            st = self.status()
            ok = st.get("wsrep_ready") == "ON" and st.get("wsrep_local_state_comment") == "Synced"
            return st if ok else None

        try:
            return _poll(f"{self.name} Synced", synced, timeout, interval=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; status {self.status()}; tail of {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: the node leaves the cluster and writes its seqno to grastate.dat)."""
        super().stop()
        if self.socket.parent != self.dir:
            try:
                self.socket.parent.rmdir()
            except OSError:
                pass

    def recover_position(self) -> str:
        """Run ``mariadbd --wsrep-recover`` (node down) and return the recovered ``uuid:seqno``.

        The recovered position comes from InnoDB, so it is right even after a SIGKILL left ``seqno: -1`` in
        grastate.dat.
        """
        if self.running:
            raise RuntimeError(f"{self.name}: --wsrep-recover needs the node to be down")
        self._prepare()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        result = subprocess.run(
            ["mariadbd", f"--defaults-file={self.cnf_path}", "--wsrep-recover", "--disable-log-error"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        found = _RECOVERED.findall(result.stderr) or _RECOVERED.findall(_tail(self.log_path, 200, since=offset))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"{self.name}: --wsrep-recover failed ({result.returncode}): {result.stderr.strip()[-1500:]}"
            )
        return found[-1]

    def restart_after_crash(self) -> str:
        """Start a crashed node at its recovered position (so it can catch up by IST); return that position."""
        position = self.recover_position()
        self.start(bootstrap=False, start_position=position)
        return position

    def joined_by(self) -> str | None:
        """How the node got its state at the last start: ``"IST"``, ``"SST"`` or None (read from its log)."""
        text = _tail(self.log_path, 400, since=self.last_start_offset)
        # The stock rsync SST script runs for both and says which one it did.
        if "rsync SST completed on joiner" in text:
            return "SST"
        if "rsync IST completed on joiner" in text:
            return "IST"
        return None

    def log_since_start(self) -> str:
        """The node's whole log from its last start on (``last_start_offset``), e.g. what its SST script said."""
        with self.log_path.open("rb") as fh:
            fh.seek(self.last_start_offset)
            return fh.read().decode(errors="replace")

    # -- inspection --------------------------------------------------------------------------------------------

    def sql(self, statement: str, timeout: float = 60.0) -> str:
        """Run SQL as root over the unix socket (inside the node's netns); tab-separated rows, no header."""
        result = subprocess.run(
            [
                *netns_prefix(self.netns),
                "mariadb", "--no-defaults", f"--socket={self.socket}", "--user=root",
                "--batch", "--skip-column-names", "--connect-timeout=5",
            ],
            input=statement,  # on stdin, so passwords inside never show up in a process listing
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: mariadb client failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def status(self) -> dict[str, Any]:
        """wsrep status: ``up`` plus the wsrep_* values (sizes and seqnos as int); ``{"up": False}`` when down."""
        if not self.running:
            return {"up": False}
        keys = ",".join(f"'{k}'" for k in _STATUS_KEYS)
        try:
            out = self.sql(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({keys})", timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return {"up": False, "error": str(exc)}
        st: dict[str, Any] = {"up": True}
        for line in out.splitlines():
            key, _, value = line.partition("\t")
            key = key.lower()
            numeric = key in ("wsrep_cluster_size", "wsrep_last_committed") and value.lstrip("-").isdigit()
            st[key] = int(value) if numeric else value
        return st

    def grastate(self) -> dict[str, Any]:
        """``grastate.dat``: ``uuid``, ``seqno`` and ``safe_to_bootstrap`` (ints); empty if there is none."""
        try:
            text = (self.datadir / "grastate.dat").read_text()
        except OSError:
            return {}
        state: dict[str, Any] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if not sep or key not in ("uuid", "seqno", "safe_to_bootstrap"):
                continue
            state[key] = value if key == "uuid" else int(value)
        return state

    def mark_safe_to_bootstrap(self) -> None:
        """Set ``safe_to_bootstrap: 1`` in grastate.dat (only on the most advanced node of a dead cluster)."""
        path = self.datadir / "grastate.dat"
        text = path.read_text()
        text, n = re.subn(r"(?m)^safe_to_bootstrap:.*$", "safe_to_bootstrap: 1", text)
        if n == 0:
            text = text.rstrip("\n") + "\nsafe_to_bootstrap: 1\n"
        path.write_text(text)


class GaleraCluster:
    """Galera nodes forming one cluster, database ``hapki`` and its users (passwords in 0600 files).

    Users, all ``@'%'``: ``hapki_clm`` (CLM) and ``hapki_cara`` (CARA) with exactly hapki.runtime.grants (applied
    after the migrations, which the bootstrap runs as root), and ``hapki`` (admin/tests) with ALL on ``hapki%``.*
    so tests can create side databases, as with hapki.lab.local.
    """

    database = "hapki"
    users = ("hapki_clm", "hapki_cara", "hapki")
    admin = "hapki"

    def __init__(self, base_dir: Path, nodes: list[GaleraNode], *,
                 tls: Callable[[GaleraNode], TlsFiles] | None = None) -> None:
        """``tls``: every node's certificate; client connections, replication, IST and the rsync SST (through
        stunnel, members pinned by sst_peers_file) are then all encrypted. The certificates must name the bare node
        name (hapki.lab.topology.Topology.cert_dns_names): the donor's stunnel checks the joiner by it."""
        if not nodes:
            raise ValueError("a Galera cluster needs at least one node")
        self.base_dir = Path(base_dir).resolve()
        self.nodes = list(nodes)
        self.tls_required = tls is not None
        if tls is not None:
            for node in self.nodes:
                node.tls = lambda node=node: tls(node)  # type: ignore[misc]
                node.sst_peers = lambda: self.sst_peers_file(tls)
        self.secrets_dir = self.base_dir / "secrets"
        self.started_in: float | None = None  # seconds the last start() took
        self._peers_lock = threading.Lock()

    def sst_peers_file(self, tls: Callable[[GaleraNode], TlsFiles]) -> Path:
        """``galera-sst-peers.pem`` beside the CA: the CA and every member's certificate, the SST's trust list.

        Rewritten at every node start from the members' current certificates (issued or reused by ``tls``). Under
        a lock: nodes prepare concurrently (bootstrap_from_most_advanced), and each issues every member's files.
        """
        with self._peers_lock:
            files = [tls(node) for node in self.nodes]
            path = files[0].ca_file.with_name(TlsFiles.SST_PEERS)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(TlsFiles.sst_peers_bundle(files))
            tmp.chmod(0o644)  # certificates only: stunnel reads it as the CA file
            tmp.replace(path)
            return path

    def password_file(self, user: str) -> Path:
        """The 0600 file holding ``user``'s password."""
        if user not in self.users:
            raise KeyError(f"unknown database user {user!r}; known: {', '.join(self.users)}")
        return self.secrets_dir / f"{user}.password"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()

    def start(self) -> GaleraCluster:
        """Form the cluster and create the database and users; return when every node is Synced.

        A fresh base_dir: node 1 bootstraps a new cluster. State from an earlier run (stopped or killed): the
        most advanced node bootstraps (see bootstrap_from_most_advanced()).
        """
        began = time.monotonic()
        try:
            if any(node.has_state() for node in self.nodes):
                self.bootstrap_from_most_advanced(_create_users=True)
            else:
                first = self.nodes[0]
                first.start(bootstrap=True)
                first.wait_synced()
                self._create_users(first)  # before the joiners: they receive it by SST
                self._join(self.nodes[1:], {})
        except BaseException:
            self._stop_quietly()
            raise
        self.started_in = time.monotonic() - began
        log.info("galera cluster of %d up in %.1f s", len(self.nodes), self.started_in)
        return self

    def _join(self, nodes: Sequence[GaleraNode], positions: dict[str, str]) -> None:
        # One joiner at a time. Two at once also worked (4 of 4 runs), but took the same 10-11 s to three Synced
        # nodes on two cores as one after the other: the state transfers do not overlap usefully. Sequential
        # joins keep the donor choice and the logs simple.
        for node in nodes:
            node.start(bootstrap=False, start_position=positions.get(node.name))
            node.wait_synced()

    def _create_users(self, node: GaleraNode) -> None:
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        passwords: dict[str, str] = {}
        fresh: dict[str, str] = {}
        for user in self.users:
            path = self.password_file(user)
            if path.exists():
                passwords[user] = path.read_text().strip()
            else:
                passwords[user] = fresh[user] = new_password()
        provision_database(node.sql, self.database, self.admin, passwords, require_ssl=self.tls_required)
        for user, password in fresh.items():  # only once the server has them, so a file always matches
            _write_secret(self.password_file(user), password)

    def bootstrap_from_most_advanced(self, *, _create_users: bool = False) -> GaleraNode:
        """Restart a cluster whose nodes are all down: bootstrap the highest seqno, then join the others.

        Positions come from grastate.dat after a clean stop and from ``--wsrep-recover`` after a crash; the chosen
        node gets ``safe_to_bootstrap: 1``. Every node starts at its position, so the others can catch up by IST.
        Returns the node that bootstrapped.
        """
        for node in self.nodes:
            if node.running:
                raise RuntimeError(f"{node.name} is running; bootstrap_from_most_advanced needs all nodes down")
        positions: dict[str, str] = {}

        def position(node: GaleraNode) -> None:
            if not node.has_state():
                return  # never joined (or wiped): it gets everything by SST
            state = node.grastate()
            if state.get("seqno", -1) >= 0 and state.get("uuid"):
                positions[node.name] = f"{state['uuid']}:{state['seqno']}"
            else:
                positions[node.name] = node.recover_position()

        _all(position, self.nodes)  # --wsrep-recover starts InnoDB: a few seconds each, so all at once
        ranked = sorted(
            (n for n in self.nodes if _seqno(positions.get(n.name, "")) >= 0),
            key=lambda n: _seqno(positions[n.name]),
            reverse=True,
        )
        if not ranked:
            raise RuntimeError(f"no node has a recoverable position: {positions}")
        leader = ranked[0]
        log.info("bootstrapping galera from %s at %s (positions %s)", leader.name, positions[leader.name], positions)
        leader.mark_safe_to_bootstrap()
        leader.start(bootstrap=True, start_position=positions[leader.name])
        leader.wait_synced()
        if _create_users:
            self._create_users(leader)
        self._join([n for n in self.nodes if n is not leader], positions)
        return leader

    def stop(self) -> None:
        """Stop every node gracefully, the first node last (it ends up ``safe_to_bootstrap: 1``)."""
        errors: list[Exception] = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except (OSError, RuntimeError) as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def _stop_quietly(self) -> None:
        try:
            self.stop()
        except (OSError, RuntimeError) as exc:
            log.warning("while cleaning up a failed galera start: %s", exc)

    def kill(self) -> None:
        """SIGKILL every node (a power cut, for fault tests)."""
        for node in self.nodes:
            node.kill()

    def status(self) -> dict[str, dict[str, Any]]:
        """Each node's status() by name."""
        return {node.name: node.status() for node in self.nodes}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------------
# NATS cluster with JetStream
# ---------------------------------------------------------------------------------------------------------------


class NatsClusterNode(_Server):
    """One nats-server of a JetStream cluster named ``hapki``; config file, store, pid file and log in its dir.

    ``routes`` are the cluster addresses (``host:port`` or ``nats-route://host:port``) of the members; a route to
    the node itself is harmless (the server recognises and drops it).
    """

    kind = "nats-server"
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(
        self,
        base_dir: Path,
        name: str,
        address: str,
        routes: list[str],
        *,
        netns: str | None = None,
        client_port: int = 4222,
        cluster_port: int = 6222,
        monitor_port: int = 8222,
        gomaxprocs: int | None = None,
    ) -> None:
        super().__init__(base_dir, name, client_port)
        self.address = address
        self.gomaxprocs = gomaxprocs
        self.routes = [r if "://" in r else f"nats-route://{r}" for r in routes]
        self.netns = netns
        self.client_port = client_port
        self.cluster_port = cluster_port
        self.monitor_port = monitor_port
        self.conf_path = self.dir / "nats-server.conf"
        self.store_dir = self.dir / "store"
        self.pid_file = self.dir / "nats-server.pid"
        # Set by NatsCluster: computes the accounts block (users and permissions) and this node's TLS files at
        # every start, so a node restarted alone (chaos) is configured like the others.
        self.security: Callable[[], tuple[str | None, TlsFiles | None]] | None = None
        self.accounts: str | None = None
        self.tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        """Client URL, ``nats://address:client_port``."""
        return f"nats://{self.address}:{self.client_port}"

    def _conf(self) -> str:
        return render.nats_conf(
            name=self.name, address=self.address, client_port=self.client_port, cluster_port=self.cluster_port,
            monitor_port=self.monitor_port, routes=self.routes, pid_file=self.pid_file, store_dir=self.store_dir,
            tls=self.tls, accounts=self.accounts,
        )

    def _prepare(self) -> None:
        _reap_stale(self.pid_file, str(self.conf_path))
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.security is not None:
            self.accounts, self.tls = self.security()
        self.conf_path.write_text(self._conf())

    def _argv(self) -> list[str]:
        # env(1) execs nats-server, so the PID we track stays the server's.
        scheduler = ["env", f"GOMAXPROCS={self.gomaxprocs}"] if self.gomaxprocs is not None else []
        return [*netns_prefix(self.netns), *scheduler, _nats_binary(), "--config", str(self.conf_path)]

    def _ready(self) -> bool:
        # Up, with JetStream enabled; a cluster member cannot be fully healthy before a meta leader exists.
        return self.healthz(js_enabled_only=True)

    def start(self) -> None:
        """Start the server and wait until it serves clients with JetStream enabled (not yet a meta leader)."""
        if self.running:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self._launch_and_wait()

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        url = f"http://{self.address}:{self.monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def healthz(self, js_enabled_only: bool = False) -> bool:
        """``/healthz``: True if healthy. By default this includes JetStream being current with the meta leader;
        ``js_enabled_only`` only asks whether the server is up with JetStream enabled."""
        if not self.running:
            return False
        try:
            status, _ = self._get("/healthz?js-enabled-only=true" if js_enabled_only else "/healthz")
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def _json(self, path: str) -> dict[str, Any]:
        if not self.running:
            return {}
        try:
            status, body = self._get(path)
        except (OSError, urllib.error.URLError):
            return {}
        return json.loads(body) if status == 200 else {}

    def varz(self) -> dict[str, Any]:
        """``/varz`` (server info and counters); empty when down."""
        return self._json("/varz")

    def jsz(self) -> dict[str, Any]:
        """``/jsz`` (JetStream, with ``meta_cluster``); empty when down."""
        return self._json("/jsz")

    def route_peers(self) -> set[str]:
        """Names of the servers this node has a route to (it keeps several connections to each: a pool)."""
        return {r["remote_name"] for r in self._json("/routez").get("routes", []) if r.get("remote_name")}

    def meta_leader(self) -> str | None:
        """Name of the JetStream meta leader as this node sees it (None if unknown or down)."""
        return self.jsz().get("meta_cluster", {}).get("leader") or None


class NatsCluster:
    """nats-servers forming the JetStream cluster ``hapki``.

    With ``users``, every connection needs one of them (hapki.runtime.bus_auth permissions); with ``tls``
    (node name -> its files), clients and routes speak TLS only, routes mutually authenticated by the CA.
    """

    def __init__(self, base_dir: Path, nodes: list[NatsClusterNode], *, users: BusUsers | None = None,
                 tls: Callable[[NatsClusterNode], TlsFiles] | None = None) -> None:
        if not nodes:
            raise ValueError("a NATS cluster needs at least one node")
        self.base_dir = Path(base_dir).resolve()
        self.nodes = list(nodes)
        self.users = users
        self.tls = tls
        self.started_in: float | None = None
        if users is not None or tls is not None:
            for node in self.nodes:
                node.security = lambda node=node: (  # type: ignore[misc]
                    users.accounts_conf() if users else None, tls(node) if tls else None)

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (give them all to clients, for failover)."""
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start all nodes at once; return when all agree on a JetStream meta leader and are healthy."""
        began = time.monotonic()
        try:
            _all(NatsClusterNode.start, self.nodes)
            self.wait_ready(timeout)
        except BaseException:
            self._stop_quietly()
            raise
        self.started_in = time.monotonic() - began
        log.info("nats cluster of %d up in %.1f s", len(self.nodes), self.started_in)
        return self

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Wait until the running nodes agree on a meta leader that sees all others current; return its name.

        A leader alone is not enough: right after an election it may not have heard from every peer yet, and an
        R3 stream created then can time out. /healthz on every node must pass too.
        """

        def agreed() -> str | None:
            running = [n for n in self.nodes if n.running]
            leaders = {n.meta_leader() for n in running}
            if len(leaders) != 1 or None in leaders:
                return None
            for n in running:
                if not {m.name for m in running if m is not n} <= n.route_peers():
                    return None  # route connections still being set up: publishes could see "no responders"
            leader = leaders.pop()
            node = next((n for n in running if n.name == leader), None)
            if node is None:
                return None
            replicas = node.jsz().get("meta_cluster", {}).get("replicas", [])
            current = {r.get("name") for r in replicas if r.get("current")}
            if not {n.name for n in running if n is not node} <= current:
                return None
            return leader if all(n.healthz() for n in running) else None

        try:
            return _poll("nats meta leader", agreed, timeout, interval=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; status {self.status()}") from None

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after the timeout), all at once."""
        _all(NatsClusterNode.stop, self.nodes)

    def _stop_quietly(self) -> None:
        try:
            self.stop()
        except (OSError, RuntimeError) as exc:
            log.warning("while cleaning up a failed nats start: %s", exc)

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()

    def status(self) -> dict[str, Any]:
        """``{"nodes": {name: {"up", "healthy", "routes", "route_peers", "meta_leader"}}, "meta_leader": name}``.

        The top-level ``meta_leader`` is None unless the nodes that are up agree on one.
        """
        nodes: dict[str, dict[str, Any]] = {}
        leaders: set[str] = set()
        for node in self.nodes:
            varz = node.varz()
            leader = node.meta_leader()
            if leader:
                leaders.add(leader)
            nodes[node.name] = {
                "up": bool(varz),
                "healthy": node.healthz() if varz else False,
                "routes": varz.get("routes", 0),  # connections: a pool of several per peer
                "route_peers": sorted(node.route_peers()) if varz else [],
                "meta_leader": leader,
            }
        return {"nodes": nodes, "meta_leader": leaders.pop() if len(leaders) == 1 else None}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
