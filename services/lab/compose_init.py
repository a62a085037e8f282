"""The Compose demo's one-shot services: `hapki compose init` (secrets) and `hapki compose provision` (data, CA).

What `hapki lab up` makes on the host, these make inside the demo, into Docker volumes, so nothing secret is in
the repository:

- ``init`` (before anything else starts): the infrastructure CA and every TLS certificate (data-tier nodes, the
  two VIPs), the bus users' passwords and the NATS ``accounts`` block (hapki.runtime.bus_auth), the database
  passwords, Grafana's admin password, CLM's approval key pair, and the SoftHSM tokens of hsm-a and hsm-b. Each
  container gets its own secrets volume (``secrets-<name>``, mounted at ``/secrets/<name>`` in init) holding
  exactly the files its config names (hapki.lab.compose_layout.consumers), owned by the user it runs as; the CA
  key and the master copies stay in ``secrets-_issuer``, which no service mounts.
  Idempotent: an existing CA, password, key or token is kept.
- ``provision`` (once Galera and NATS are healthy): the database users, migrations and grants over db-1's root
  socket (the same statements as the lab's bootstrap), the JetStream streams as the bus admin, then
  `hapki ca init` (CA keys generated in hsm-a and replicated into hsm-b under a KEK).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import bcrypt

from hapki.lab import compose, stack, tls
from hapki.lab.compose_layout import ISSUER, Consumer
from hapki.lab.data import new_password, provision_database
from hapki.lab.local import BusUsers, SoftHSM, TlsFiles, _write_secret, root_sql
from hapki.lab.topology import Topology
from hapki.runtime.config import NatsConfig
from hapki.runtime.grants import ADMIN_USER, CARA_USER, CLM_USER

__all__ = ["init_secrets", "provision"]

DB_USERS = (CLM_USER, CARA_USER, ADMIN_USER)
GRAFANA_ADMIN = "grafana-admin.password"


def _bus_users(topo: Topology, issuer: Path) -> BusUsers:
    watchers = [BusUsers.watcher_user(tier, m) for tier, t in topo.tiers.items() for m in t.members]
    return BusUsers(issuer / "bus", [*BusUsers.DEFAULT, *watchers])


def _db_password_file(issuer: Path, user: str) -> Path:
    return issuer / "db" / f"{user}.password"


def _copy(src: Path, dst: Path) -> None:
    """Copy a file into a consumer's directory, 0600, unless it is there already with the same bytes."""
    _write_if_changed(dst, src.read_bytes())


def _write_if_changed(dst: Path, data: bytes) -> None:
    """Write ``data`` to ``dst``, 0600, unless it is there already with the same bytes."""
    if dst.exists() and dst.read_bytes() == data:
        return
    dst.unlink(missing_ok=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for child in path.rglob("*"):
        os.chown(child, uid, uid, follow_symlinks=False)


def init_secrets(topo: Topology, secrets_dir: Path, hsm_dir: Path, *, chown: bool = True) -> dict[str, Path]:
    """Create (or keep) every secret of the demo; return each consumer's directory by name.

    ``chown``: give each directory to the user its container runs as (init runs as root); tests pass False.
    """
    secrets_dir, hsm_dir = Path(secrets_dir), Path(hsm_dir)
    issuer = secrets_dir / ISSUER
    issuer.mkdir(mode=0o700, parents=True, exist_ok=True)
    issuer.chmod(0o700)  # a volume's root comes 0755
    ca = tls.create_infra_ca(issuer / "tls")
    bus = _bus_users(topo, issuer)
    accounts = bus.accounts_conf()  # creates the missing bus passwords
    for user in DB_USERS:
        path = _db_password_file(issuer, user)
        if not path.exists():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            _write_secret(path, new_password())
    approval_key, approval_pub = stack.approval_keys(issuer / "approval")
    if not (issuer / GRAFANA_ADMIN).exists():
        _write_secret(issuer / GRAFANA_ADMIN, new_password())
    vip_pems = {tier: tls.issue_server_cert(ca, issuer / "tls", f"{tier}-vip", [str(t.vip)],
                                            [f"{tier}.{topo.lab.prefix}.lab"])
                for tier, t in topo.tiers.items()}

    dirs: dict[str, Path] = {}
    galera: dict[str, TlsFiles] = {}  # the Galera nodes' certificates, for their SST trust list
    consumers = compose.consumers(topo)
    for name, consumer in consumers.items():
        d = secrets_dir / name
        d.mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o700)
        dirs[name] = d
        issued = _fill(consumer, d, issuer, ca, bus, accounts, vip_pems, approval_key, approval_pub)
        if consumer.sst_peers and issued is not None:
            galera[name] = issued
    # The trust list needs every member's certificate, so it comes after all are issued.
    bundle = TlsFiles.sst_peers_bundle(list(galera.values())) if galera else b""
    for name in galera:
        _write_if_changed(dirs[name] / TlsFiles.SST_PEERS, bundle)
    if chown:
        for name, d in dirs.items():
            _chown_tree(d, consumers[name].uid)

    for name in topo.hsm.members:
        hsm = SoftHSM(hsm_dir, name)  # its softhsm2.conf and PIN files live in the member's volume
        hsm.start()
        hsm.init_token(compose.token_label(name))
        if chown:
            _chown_tree(hsm.dir, compose.HAPKI_UID)
    return dirs


def _fill(consumer: Consumer, d: Path, issuer: Path, ca: tls.InfraCA, bus: BusUsers, accounts: str,
          vip_pems: dict[str, Path], approval_key: Path, approval_pub: Path) -> TlsFiles | None:
    """Put exactly what ``consumer``'s configs name into its directory ``d``; return its server TLS files, if any."""
    _copy(ca.cert_path, d / "infra-ca.pem")
    issued = None
    if consumer.tls_name:
        issued = TlsFiles.issue(d, consumer.tls_name, [str(consumer.tls_address)], list(consumer.tls_dns),
                                client_auth=True, ca=ca)
    if consumer.accounts:
        target = d / "accounts.conf"
        if not target.exists() or not _same_accounts(target.read_text(), accounts, bus):
            target.unlink(missing_ok=True)
            _write_secret(target, accounts)
    for user in consumer.bus_users:
        _copy(bus.password_file(user), d / f"nats-{user}.password")
    for user in consumer.db_users:
        _copy(_db_password_file(issuer, user), d / f"{user}.password")
    if consumer.vip_tier:
        _copy(vip_pems[consumer.vip_tier], d / f"{consumer.vip_tier}-vip.pem")
    if consumer.grafana_admin:
        _copy(issuer / GRAFANA_ADMIN, d / GRAFANA_ADMIN)
    if consumer.approval == "private":
        _copy(approval_key, d / approval_key.name)
    elif consumer.approval == "public":
        _copy(approval_pub, d / approval_pub.name)
    return issued


def _socket_sql(socket: Path) -> Callable[[str], str]:
    """Root's SQL over db-1's socket (the provision container runs as uid 0: unix_socket authentication)."""
    return lambda statement: root_sql(socket, statement, timeout=300)


def provision(topo: Topology, secrets: Path, socket: Path, cara_config: Path, hsm_dir: Path, *,
              nats: NatsConfig | None = None) -> None:
    """Database users, migrations and grants; the streams; the CA. Runs as root in the `provision` container.

    ``nats``: the bus as its admin (default: the demo's cluster with this container's password file).
    """
    from hapki.runtime import bus

    secrets = Path(secrets)
    passwords = {user: (secrets / f"{user}.password").read_text().strip() for user in DB_USERS}
    provision_database(_socket_sql(socket), "hapki", ADMIN_USER, passwords, require_ssl=True)

    async def streams() -> None:
        config = nats or compose.nats_admin(topo)
        nc = await bus.connect(config, name="hapki-compose-provision")
        try:
            await bus.ensure_topology(nc.jetstream(timeout=30), config)
        finally:
            await nc.close()

    asyncio.run(streams())
    result = subprocess.run([*stack.hapki_command(), "ca", "init", "--config", str(cara_config), "--out",
                             str(secrets)], capture_output=True, text=True, timeout=300, check=False)
    print(result.stdout + result.stderr, end="")
    if result.returncode != 0:
        raise RuntimeError(f"hapki ca init failed ({result.returncode})")
    # The ceremony ran as root: the token files belong to the user CARA runs as.
    for name in topo.hsm.members:
        member_dir = Path(hsm_dir) / name
        if member_dir.exists():
            _chown_tree(member_dir, compose.HAPKI_UID)


_USER_HASH = re.compile(r'"user": "([^"]+)",\s*"password": "(\$2a\$[^"]+)"')


def _same_accounts(existing: str, wanted: str, bus: BusUsers) -> bool:
    """Whether `existing` grants what `wanted` does: bcrypt salts differ per rendering, so the texts are compared
    with the hashes masked, and each existing hash must still verify its user's current password."""
    def masked(text: str) -> str:
        return _USER_HASH.sub(lambda m: f'"user": "{m.group(1)}", "password": "-"', text)

    if masked(existing).rstrip() != masked(wanted).rstrip():
        return False
    return all(bcrypt.checkpw(bus.password_file(user).read_text().strip().encode(), digest.encode())
               for user, digest in _USER_HASH.findall(existing))
