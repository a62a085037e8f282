"""The hapki services on a LocalEnv: service configs, CA initialisation, and CARA/CLM as child processes.

Used by `hapki demo`, `hapki bench` and the tests that crash a service. Tests that inspect spans run the
same runtimes in-process from the configs built here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from hapki.cara.config import CaraConfig
from hapki.clm.config import ClmConfig
from hapki.lab.local import LocalEnv, free_port
from hapki.runtime.approval import generate_key_files
from hapki.runtime.grants import CARA_USER, CLM_USER
from hapki.runtime.config import DatabaseConfig, HSMConfig, HSMMember, MetricsConfig, NatsConfig

TOKEN = "hapki-a"


def nats_config(env: LocalEnv, user: str = "admin") -> NatsConfig:
    """The env's bus as `user` (hapki.lab.local.BusUsers; the services use their own)."""
    config: NatsConfig = env.nats.nats_config(user)
    return config


def database_config(env: LocalEnv, user: str | None = None, **overrides: Any) -> DatabaseConfig:
    """The env's database as `user` (default: the admin; the services use their own, see hapki.runtime.grants)."""
    user = user or env.db.user
    tls = {"tls_ca_file": env.db.tls.ca_file} if env.db.tls else {}
    return DatabaseConfig(
        nodes=[f"127.0.0.1:{env.db.port}"], user=user, password_file=env.db.password_file_for(user),
        database=env.db.database, **tls, **overrides,
    )


def private_module(env: LocalEnv, member: str) -> Path:
    """A private copy of the PKCS#11 library for one HSM member.

    python-pkcs11 loads a module path once per process and SoftHSM reads SOFTHSM2_CONF once per loaded library,
    so independent token stores in one process (two HSM members, or tests) need distinct paths (FIELD-NOTES).
    """
    copy = env.hsm.conf_path.parent / f"libsofthsm2-{member}.so"
    if not copy.exists():
        tmp = copy.with_suffix(".tmp")
        shutil.copyfile(env.hsm.module_path, tmp)
        tmp.replace(copy)
    return copy


def hsm_config(env: LocalEnv) -> HSMConfig:
    return HSMConfig(members=[HSMMember(
        name="hsm-a", module_path=private_module(env, "hsm-a"), token_label=TOKEN, pin_file=env.hsm.pin_file(TOKEN),
        softhsm_conf=env.hsm.conf_path,
    )])


def approval_keys(config_dir: Path) -> tuple[Path, Path]:
    """CLM's approval key pair in `config_dir` (private key 0600, public key), created on first use."""
    private, public = config_dir / "clm-approval.key", config_dir / "clm-approval.pub"
    if not private.exists():
        try:
            generate_key_files(private, public)
        except FileExistsError:
            pass  # made concurrently by another caller: theirs is as good
    return private, public


def local_metrics() -> MetricsConfig:
    """/metrics on loopback at a free port: on one host the fixed ports (9101..) would collide between stacks."""
    return MetricsConfig(listen=f"127.0.0.1:{free_port()}")


def clm_config(env: LocalEnv, member: str = "clm-1", **overrides: Any) -> ClmConfig:
    private, _ = approval_keys(env.base_dir / "approval")
    return ClmConfig(member=member, nats=nats_config(env, "clm"), database=database_config(env, CLM_USER),
                     **{"approval_key_file": private, "metrics": local_metrics(), **overrides})


def cara_config(env: LocalEnv, member: str = "cara-1", **overrides: Any) -> CaraConfig:
    _, public = approval_keys(env.base_dir / "approval")
    return CaraConfig(member=member, nats=nats_config(env, "cara"), database=database_config(env, CARA_USER),
                      hsm=hsm_config(env), **{"approval_public_keys": [public], "metrics": local_metrics(),
                                              **overrides})


def write_config(config: ClmConfig | CaraConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config.model_dump(mode="json", exclude_none=True)))
    return path


def hapki_command() -> list[str]:
    return [sys.executable, "-m", "hapki.cli.main"]


class ServiceProcess:
    """`hapki serve <service>` as a child process, its output in a log file."""

    def __init__(self, service: str, config_path: Path, log_path: Path, env: dict[str, str], *,
                 supervise: bool = False) -> None:
        self.service, self.config_path, self.log_path, self._env = service, config_path, log_path, env
        self.supervise = supervise  # `--supervise`: `proc` is the supervisor, the service runs in its child
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, extra_env: dict[str, str] | None = None) -> ServiceProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*hapki_command(), "serve", self.service, "--config", str(self.config_path),
                 *(["--supervise"] if self.supervise else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**self._env, **(extra_env or {})},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"hapki {self.service} ready" in self.log_path.read_text(errors="replace")[offset:]:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[offset:][-3000:]
        self.kill()
        raise RuntimeError(f"hapki {self.service} did not become ready:\n{tail}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class LocalStack:
    """LocalEnv + an initialised CA + one CARA and one CLM process."""

    def __init__(self, base_dir: Path, *, trace_file: Path | None = None, clm_overrides: dict[str, Any] | None = None,
                 cara_overrides: dict[str, Any] | None = None, env_overrides: dict[str, str] | None = None) -> None:
        """`clm_overrides`/`cara_overrides`: config fields for the services, e.g. `http_listen` (the benchmarks);
        `env_overrides`: environment variables of the service processes, e.g. the trace sampler (the benchmarks)."""
        self.base_dir = Path(base_dir).resolve()
        self.env = LocalEnv(self.base_dir)
        self.trace_file = trace_file
        self.env_overrides = dict(env_overrides or {})
        self.clm_overrides, self.cara_overrides = dict(clm_overrides or {}), dict(cara_overrides or {})
        self.cara: ServiceProcess | None = None
        self.clm: ServiceProcess | None = None

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAPKI_FAULTS")}
        env["SOFTHSM2_CONF"] = str(self.env.hsm.conf_path)
        if self.trace_file is not None:
            env["HAPKI_TRACE_FILE"] = str(self.trace_file)
        return env | self.env_overrides

    def start(self) -> LocalStack:
        self.env.start()
        try:
            conf = self.base_dir / "config"
            cara_path = write_config(cara_config(self.env, **self.cara_overrides), conf / "cara.toml")
            clm_path = write_config(clm_config(self.env, **self.clm_overrides), conf / "clm.toml")
            subprocess.run([*hapki_command(), "ca", "init", "--config", str(cara_path), "--out", str(conf)],
                           check=True, env=self.child_env(), capture_output=True, timeout=120)
            logs = self.base_dir / "logs"
            logs.mkdir(exist_ok=True)
            self.cara = ServiceProcess("cara", cara_path, logs / "cara.log", self.child_env()).start()
            self.clm = ServiceProcess("clm", clm_path, logs / "clm.log", self.child_env()).start()
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.stop()
            raise RuntimeError(f"local stack failed to start: {exc}\n{detail.decode(errors='replace')}") from exc
        return self

    def stop(self) -> None:
        for proc in (self.clm, self.cara):
            if proc is not None:
                proc.stop()
        self.env.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
