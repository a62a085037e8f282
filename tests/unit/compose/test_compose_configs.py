"""The configs the compose demo mounts pass their own tools' checks, with the files its init service makes.

`hapki compose init` (hapki.lab.compose_init.init_secrets, what the demo's init container runs) writes every
secret into a temporary directory standing for the `secrets` and HSM volumes. Each container is then laid out
the way docker-compose.yml mounts it (a directory per container with a link at each mount target), the
container paths in its configs point into that layout, and keepalived, haproxy, nats-server and mariadbd check
the configs as the lab's own tests do (tests/lab/test_lab_topology.py, tests/unit/lab/test_data_templates.py).
A config naming a file the init does not make, or a mount the compose file does not have, fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hapki.cara.config import CaraConfig
from hapki.clm.config import ClmConfig
from hapki.lab import compose
from hapki.lab.compose_document import secrets_volume
from hapki.lab.compose_init import init_secrets
from hapki.lab.local import _nats_binary
from hapki.lab.topology import default
from hapki.runtime.config import load_toml
from hapki.watcher.main import WatcherConfig

COMPOSE = compose.COMPOSE_DIR


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's named volumes after its init service ran (module scope: one init for all checks)."""
    base = tmp_path_factory.mktemp("volumes")
    dirs = init_secrets(default(), base / "secrets", base / "hsm", chown=False)
    return {**{secrets_volume(name): d for name, d in dirs.items()},
            **{h: base / "hsm" / h for h in default().hsm.members}}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]  # type: ignore[no-any-return]


class Container:
    """A service's file system as the compose file mounts it: ``root/<target>`` links to each mount's source."""

    def __init__(self, name: str, service: dict[str, Any], volumes: dict[str, Path], tmp: Path) -> None:
        self.name, self.root = name, tmp / f"root-{name}"
        self.targets: list[str] = []
        for mount in service.get("volumes", []):
            if mount["type"] == "bind":
                source = COMPOSE / mount["source"]
            elif mount["source"] in volumes:
                source = volumes[mount["source"]]
            else:
                continue  # data volumes (datadirs, stores): empty at first start
            assert source.exists(), f"{name}: {mount['source']} is not there after init"
            link = self.root / mount["target"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve())
            self.targets.append(mount["target"])
        self._pattern = re.compile("|".join(re.escape(t) for t in sorted(self.targets, key=len, reverse=True)))

    def rewrite(self, text: str) -> str:
        """``text`` with every path under a mount target moved into this layout."""
        return self._pattern.sub(lambda m: f"{self.root}{m.group(0)}", text)

    def config(self, target: str) -> Path:
        """The file mounted at ``target``, rewritten, in place of its link (relative includes resolve as inside)."""
        path = self.root / target.lstrip("/")
        text = self.rewrite(path.read_text())
        path.unlink()
        path.write_text(text)
        path.chmod(0o644)
        return path

    def host(self, container_path: Path | str) -> Path:
        path = str(container_path)
        assert any(path.startswith(t + "/") or path == t for t in self.targets), \
            f"{self.name}: {path} is under no mount of this container"
        return self.root / path.lstrip("/")


@pytest.fixture
def container(services: dict[str, Any], volumes: dict[str, Path], tmp_path: Path) -> Callable[[str], Container]:
    return lambda name: Container(name, services[name], volumes, tmp_path)


TIER_MEMBERS = [m for tier in default().tiers.values() for m in tier.members]


@pytest.mark.skipif(shutil.which("keepalived") is None, reason="keepalived not installed")
@pytest.mark.parametrize("member", TIER_MEMBERS)
def test_keepalived_accepts_the_member_config(container: Callable[[str], Container], member: str) -> None:
    conf = container(member).config("/etc/hapki/keepalived.conf")
    result = subprocess.run(["keepalived", "--config-test", "-f", str(conf)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr + result.stdout
    vip = default().vip(str(default().tier_of(member)))
    assert f"{vip}/24 dev eth0" in conf.read_text()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
@pytest.mark.parametrize("member", TIER_MEMBERS)
def test_haproxy_accepts_the_member_config_with_the_vip_certificate(container: Callable[[str], Container],
                                                                     member: str) -> None:
    cfg = container(member).config("/etc/hapki/haproxy.cfg")
    result = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr + result.stdout  # -c also loads the PEM named by `crt`


@pytest.mark.parametrize("node", default().members_by_role("nats"))
def test_nats_server_accepts_the_node_config_with_its_users_and_certificates(
        container: Callable[[str], Container], node: str) -> None:
    conf = container(node).config("/etc/nats/nats.conf")
    result = subprocess.run([_nats_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    # -t parses the whole file (the included users too), then tries to bind: refusing the (not local) address
    # means the configuration itself was fine.
    assert result.returncode == 0 or "cannot assign requested address" in result.stderr, result.stderr
    accounts = (conf.parent / "secrets" / "accounts.conf").read_text()
    assert "allow_responses" in accounts and f"watcher-{TIER_MEMBERS[0]}" in accounts


@pytest.mark.skipif(shutil.which("mariadbd") is None, reason="mariadb-server is not installed")
@pytest.mark.parametrize("node", default().members_by_role("db"))
def test_mariadbd_accepts_the_galera_config(container: Callable[[str], Container], node: str) -> None:
    c = container(node)
    cnf = c.config("/etc/mysql/hapki/galera.cnf")
    result = subprocess.run(["mariadbd", f"--defaults-file={cnf}", "--help", "--verbose"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("\nVariables (--variable-name=value)", 1)[1]  # the values, after the help text
    values = dict(line.split(None, 1) for line in table.splitlines() if len(line.split(None, 1)) == 2)
    assert values["wsrep-node-name"].strip() == node
    assert values["wsrep-cluster-address"].strip() == "gcomm://10.213.3.21:4567,10.213.3.22:4567,10.213.3.23:4567"
    assert values["wsrep-sst-method"].strip() == "rsync" and "\nuser=mysql\n" in cnf.read_text()
    for option in ("ssl-cert", "ssl-key", "ssl-ca"):  # the TLS files the init made for this node
        assert Path(values[option].strip()).is_file(), option


def _files(config: Any) -> list[Path]:
    """Every file a service config names (password, TLS, approval key, HSM PIN and softhsm2.conf)."""
    names = ("password_file", "tls_ca_file", "approval_key_file", "pin_file", "softhsm_conf")
    found: list[Path] = []
    for key, value in config:
        if key in names and value is not None:
            found.append(value)
        elif key == "approval_public_keys":
            found += value
        elif hasattr(type(value), "model_fields"):
            found += _files(value)
        elif key == "members":
            for member in value:
                found += _files(member)
    return found


@pytest.mark.parametrize("member", TIER_MEMBERS)
def test_service_configs_load_and_every_file_they_name_is_made_by_init(
        container: Callable[[str], Container], member: str) -> None:
    tier = str(default().tier_of(member))
    c = container(member)
    model = {"cara": CaraConfig, "clm": ClmConfig}[tier]
    config = load_toml(c.config(f"/etc/hapki/{tier}.toml"), model)
    assert config.member == member
    files = _files(config)
    assert len(files) >= (5 if tier == "cara" else 3)
    for path in files:
        assert Path(path).is_file(), f"{member}: {path} is not made by `hapki compose init`"
    if tier == "cara":
        modules = [m.module_path for m in config.hsm.members]  # type: ignore[attr-defined]
        assert [p.name for p in modules] == [f"libsofthsm2-{h}.so" for h in default().hsm.members]
        dockerfile = (COMPOSE / "images" / "hapki" / "Dockerfile").read_text()
        assert str(compose.SOFTHSM_COPIES) in dockerfile  # the image makes one copy per HSM member there
    watcher = container(f"watcher-{member}")
    wconfig = load_toml(watcher.config("/etc/hapki/watcher.toml"), WatcherConfig)
    for path in _files(wconfig):
        assert Path(path).is_file(), f"watcher-{member}: {path} is not made by `hapki compose init`"


def test_the_provisioner_has_what_ca_init_and_the_database_need(container: Callable[[str], Container]) -> None:
    c = container("provision")
    config = load_toml(c.config("/etc/hapki/cara.toml"), CaraConfig)
    for path in [*_files(config.database), *_files(config.hsm)]:  # what `hapki ca init` reads
        assert Path(path).is_file(), f"provision: {path} missing"
    for user in ("hapki", "hapki_cara", "hapki_clm"):
        assert c.host(f"/run/hapki/{user}.password").is_file()
    for hsm in default().hsm.members:  # `hapki ca init` replicates the CA keys with both SO PINs
        label = compose.token_label(hsm)
        assert c.host(f"/var/lib/hsm/{hsm}/{label}.so-pin").is_file()


def test_secrets_stay_out_of_reach(volumes: dict[str, Path]) -> None:
    secrets = volumes[secrets_volume("provision")].parent
    # Only the init service mounts _issuer (the infrastructure CA's key, the master copies).
    assert (secrets / "_issuer" / "tls" / "infra-ca.key").is_file()
    assert not list(secrets.glob("[!_]*/infra-ca.key"))
    assert (secrets / "clm-1" / "clm-approval.key").is_file() and not (secrets / "cara-1" / "clm-approval.key").exists()
    assert not (secrets / "cara-1" / "hapki.password").exists()  # services never get the database admin
    for path in secrets.rglob("*"):
        if path.is_file() and path.suffix in (".password", ".key", ".pem", ".conf") and path.name != "infra-ca.pem":
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    committed = "\n".join(p.read_text() for p in (COMPOSE / "rendered").rglob("*") if p.is_file())
    for password in (secrets / "_issuer").rglob("*.password"):
        assert password.read_text().strip() not in committed


def test_init_is_idempotent(tmp_path: Path) -> None:
    topo = default()
    init_secrets(topo, tmp_path / "s", tmp_path / "h", chown=False)
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    init_secrets(topo, tmp_path / "s", tmp_path / "h", chown=False)
    after = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.skipif(shutil.which("promtool") is None, reason="prometheus (promtool) is not installed")
def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """The config as the container sees it: its rule file (bound at /etc/prometheus/alerts.yml) beside it."""
    text = (COMPOSE / "prometheus" / "prometheus.yml").read_text()
    assert "- /etc/prometheus/alerts.yml\n" in text  # rule_files: the alerting rules are loaded
    shutil.copy(COMPOSE / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml")))
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules found" in result.stdout  # it read the rule file too
    broken = tmp_path / "broken.yml"  # the check can fail: a scrape job without a name
    broken.write_text(config.read_text().replace("- job_name: cara\n", "- jobname: cara\n"))
    assert subprocess.run(["promtool", "check", "config", str(broken)], capture_output=True, timeout=60).returncode
