"""The HA lab: the reference topology (compose/topology.toml) in network namespaces on this host (root only).

`Lab(base_dir).up()` builds it, step by step:

1. the network (hapki.lab.network): a namespace per member, one bridge per segment, nftables flows;
2. at once, in threads: the Galera cluster (db-1..3) and the NATS cluster (nats-1..3) in their namespaces
   (hapki.lab.data); the two SoftHSM token sets hsm-a and hsm-b; the infrastructure TLS certificates of the
   two VIPs; per CARA/CLM member its rendered keepalived.conf and haproxy.cfg, and keepalived and haproxy started;
3. `hapki ca init` on the host with both HSM members (the CA keys are generated once and replicated);
4. per CARA/CLM member the service (`hapki serve cara|clm`) and its watcher, all at once;
5. a gate: each VIP on its preferred (highest priority) member, and HTTPS /health through each VIP from the host;
6. Prometheus on the host (hapki.lab.prometheus), scraping every service of every member, until it is ready.

Every process is recorded by PID in `base_dir/state.json` (hapki.lab.cluster), so `down()` stops everything
from any process, after a failed `up()` too, and then removes the namespaces and the host veth by name. The data
(Galera datadirs, tokens, certificates) stays in base_dir: a later `up()` restarts on it (`fresh=True` wipes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hapki.cara.config import CaraConfig
from hapki.clm.config import ClmConfig
from hapki.lab import compose_layout, prometheus, render, stack, tls, vrrp
from hapki.lab.cluster import ProcessTable, _cmdline, wait_until
from hapki.lab.data import GaleraCluster, GaleraNode, NatsCluster, NatsClusterNode
from hapki.lab.local import BusUsers, SoftHSM, TlsFiles, _pid_running, _tail
from hapki.lab.network import LabNetwork, NetworkError, list_namespaces, netns_pids
from hapki.lab.topology import Topology, default
from hapki.runtime.config import DatabaseConfig, HSMConfig, HSMMember, NatsConfig
from hapki.watcher.main import WatcherConfig

__all__ = ["DEFAULT_DIR", "Lab", "LabBusy", "LabError", "format_status", "require_root"]

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(".run/lab")
SERVICE_READY_TIMEOUT = 90.0  # seconds; 8 Python processes start at once on 2 cores
VIP_TIMEOUT = 10.0
HTTPS_TIMEOUT = 30.0
# A track script rises after TRACK_RISE successes TRACK_INTERVAL apart, once its service answers.
RISE_TIMEOUT = 20.0
STREAMS_API_TIMEOUT = 15.0  # seconds per JetStream API call while the lab creates its streams
STREAMS_ATTEMPTS = 3  # of creating the streams; a rolling restart of the NATS servers between attempts
PROMETHEUS_ATTEMPTS = 3
# Stop order of `down()`: callers first, then what they call; Galera last and one node at a time (the first
# node stops last and is left safe_to_bootstrap, see hapki.lab.data).
_STOP_WAVES = (("prometheus", "watcher"), ("clm", "cara"), ("haproxy", "keepalived"), ("nats",))
PROMETHEUS_TIMEOUT = 30.0
# Seconds a replica of the signing stream may take to catch up before heal() restarts its server.
CATCHUP_PATIENCE_SECONDS = 45.0


class LabError(RuntimeError):
    """The lab cannot be built, reached or stopped; the message says which step and why."""


class LabBusy(LabError):
    """Another lab (another base_dir) runs on this host: the names and addresses exist once per host."""


def require_root() -> None:
    """LabError unless this process is root and `ip netns` works."""
    if os.geteuid() != 0:
        raise LabError("the HA lab needs root (network namespaces, veth, nftables, keepalived): run as root")
    if shutil.which("ip") is None:
        raise LabError("iproute2 (`ip`) is not installed")


class Lab:
    """The HA lab rooted at ``base_dir``; see the module docstring."""

    def __init__(self, base_dir: Path = DEFAULT_DIR, topology: Topology | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.topo = topology or default()
        self.net = LabNetwork(self.topo)
        self.procs = ProcessTable(self.base_dir / "state.json")
        self.timings: dict[str, float] = {}
        topo, ports = self.topo, self.topo.ports
        addr = lambda m: str(topo.address(m))
        dbs, buses = topo.members_by_role("db"), topo.members_by_role("nats")
        self.tls_dir = self.base_dir / "tls"
        # The data tier speaks TLS only, with certificates of the lab's infrastructure CA (issued at each start);
        # every bus user has its own password and subjects (hapki.runtime.bus_auth).
        self.bus_users = BusUsers(self.base_dir / "secrets", [
            *BusUsers.DEFAULT, *(BusUsers.watcher_user(tier, m) for tier, t in topo.tiers.items() for m in t.members)])
        self.galera = GaleraCluster(self.base_dir, [
            GaleraNode(self.base_dir, m, addr(m), [f"{addr(p)}:{ports.galera}" for p in dbs],
                       netns=topo.namespace(m), port=ports.mariadb, galera_port=ports.galera,
                       ist_port=ports.ist, sst_port=ports.sst)
            for m in dbs
        ], tls=lambda node: self._data_tls(node.name, node.address))
        self.nats = NatsCluster(self.base_dir, [
            NatsClusterNode(self.base_dir, m, addr(m), [f"{addr(p)}:{ports.nats_cluster}" for p in buses],
                            netns=topo.namespace(m), client_port=ports.nats_client,
                            cluster_port=ports.nats_cluster, monitor_port=ports.nats_monitor,
                            gomaxprocs=topo.bus.gomaxprocs)
            for m in buses
        ], users=self.bus_users, tls=lambda node: self._data_tls(node.name, node.address))
        self.hsms = {name: SoftHSM(self.base_dir / "hsm", name) for name in topo.hsm.members}
        self.config_dir = self.base_dir / "config"
        self.trace_file = self.base_dir / "traces.jsonl"
        self.prometheus_dir = self.base_dir / "prometheus"

    # --- names and paths ------------------------------------------------------------------------------------

    @property
    def ca_bundle(self) -> Path:
        """The infrastructure CA that signed the VIPs' TLS certificates (for curl --cacert / ssl contexts)."""
        return self.tls_dir / "infra-ca.pem"

    @property
    def hapki_root(self) -> Path:
        """The hapki root CA certificate written by `hapki ca init`."""
        return self.config_dir / "root.pem"

    @property
    def nats_urls(self) -> list[str]:
        return self.nats.urls

    def url(self, tier: str) -> str:
        """https URL of a tier's VIP, e.g. https://10.213.1.100 (CLM)."""
        t = self.topo.tiers[tier]
        return f"https://{t.vip}" + ("" if t.https_port == 443 else f":{t.https_port}")

    def plain_url(self, tier: str) -> str | None:
        """http URL of a tier's VIP for OCSP and CRLs (e.g. http://10.213.2.100); None if it serves none."""
        t = self.topo.tiers[tier]
        if t.http_port is None:
            return None
        return f"http://{t.vip}" + ("" if t.http_port == 80 else f":{t.http_port}")

    @property
    def prometheus_url(self) -> str:
        """The lab's Prometheus (web UI and HTTP API), on the host's loopback."""
        return f"http://{prometheus.LISTEN}"

    def tier_members(self) -> list[str]:
        """All members of the VRRP tiers (cara-1, cara-2, clm-1, clm-2)."""
        return [m for tier in self.topo.tiers for m in self.topo.members_of_tier(tier)]

    def preferred(self, tier: str) -> str:
        """The member of ``tier`` with the highest VRRP priority (where the VIP belongs when all is well)."""
        return max(self.topo.members_of_tier(tier), key=lambda m: self.topo.members[m].priority or 0)

    @staticmethod
    def token_label(hsm: str) -> str:
        """SoftHSM token label of an HSM member: hsm-a -> hapki-a (as in the Compose demo)."""
        return compose_layout.token_label(hsm)

    def member_dir(self, member: str) -> Path:
        return self.base_dir / member

    def service_config_path(self, member: str) -> Path:
        return self.config_dir / f"{member}.toml"

    def watcher_config_path(self, member: str) -> Path:
        return self.config_dir / f"watcher-{member}.toml"

    # --- up -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - began, 2)
            log.info("lab: %s took %.2f s", name, self.timings[name])

    def _timed(self, name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self._step(name):
                fn()
        return run

    def up(self, *, fresh: bool = False, keep_on_failure: bool = False) -> dict[str, float]:
        """Build and start the whole lab; return the seconds each step took (`total` included).

        Leftovers of an earlier run (processes, namespaces) are removed first. On failure everything started
        is stopped again (unless ``keep_on_failure``, for debugging) and LabError says what failed.
        """
        require_root()
        self.timings = {}
        began = time.monotonic()
        foreign = self.foreign_processes()
        if foreign:
            pid, cmdline = next(iter(foreign.items()))
            raise LabBusy(f"another lab runs on this host ({len(foreign)} processes in its namespaces, e.g. pid "
                          f"{pid}: {cmdline[:150]}); stop it first with `hapki lab down --dir <its directory>` (any --dir "
                          f"removes the lab network and what runs in it)")
        self.down()
        if fresh and self.base_dir.exists():
            shutil.rmtree(self.base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.procs.set_meta(state="starting", base_dir=str(self.base_dir), started_at=time.time())
        try:
            # Step 1: the network; the service configs (they only name addresses and files).
            with self._step("network"):
                self.net.create()
            self._write_service_configs()
            # The infrastructure CA and the bus passwords once, before the nodes that use them start in parallel.
            tls.create_infra_ca(self.tls_dir)
            self.bus_users.accounts_conf()
            # Step 2: the data tier and the front ends (HSM, TLS, keepalived, haproxy) need nothing from each other.
            with self._step("data+front"):
                with ThreadPoolExecutor(max_workers=3, thread_name_prefix="lab-up") as pool:
                    futures = [pool.submit(self._timed("galera", self._start_galera)),
                               pool.submit(self._timed("nats", self._start_nats)),
                               pool.submit(self._timed("front", self._start_front))]
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    raise errors[0]  # type: ignore[misc]
            # Step 3: the CA, and the streams (created once here: eight services racing to create R3 streams
            # on a busy 2-core host ran into JetStream API timeouts).
            with self._step("ca_init+streams"):
                with ThreadPoolExecutor(max_workers=2, thread_name_prefix="lab-up") as pool:
                    futures = [pool.submit(self._timed("ca_init", self._ca_init)),
                               pool.submit(self._timed("streams", self._ensure_streams))]
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    raise errors[0]  # type: ignore[misc]
            # Step 4: CARA and CLM and their watchers, all at once; Step 5: the gate.
            with self._step("services"):
                self._start_services()
            with self._step("gate"):
                self._gate()
            # Step 6: Prometheus (after the gate: its first scrape then finds every service up).
            with self._step("prometheus"):
                try:
                    self._start_prometheus()
                except LabError as exc:
                    # Observability, not the lab: the services run without it (`lab status` says it is down).
                    log.warning("the lab runs without Prometheus: %s", exc)
        except BaseException as exc:
            self.procs.set_meta(state="failed", error=str(exc)[:2000])
            if not keep_on_failure:
                try:
                    self.down()
                except (OSError, RuntimeError) as cleanup:
                    log.warning("while cleaning up the failed lab: %s", cleanup)
            if isinstance(exc, (LabError, KeyboardInterrupt)):
                raise
            raise LabError(f"lab up failed: {exc}") from exc
        self.timings["total"] = round(time.monotonic() - began, 2)
        self.procs.set_meta(state="up", timings=self.timings, up_at=time.time())
        log.info("lab up in %.1f s: %s", self.timings["total"], self.timings)
        return dict(self.timings)

    def foreign_processes(self) -> dict[int, str]:
        """Processes in the lab's namespaces that do not belong to this base_dir (another lab on this host)."""
        mine = str(self.base_dir) + "/"
        found = {}
        for ns in self.net.lab_namespaces():
            for pid in netns_pids(ns):
                cmdline = _cmdline(pid)
                if cmdline and mine not in cmdline:
                    found[pid] = cmdline
        return found

    def detach(self) -> None:
        """Leave the lab running when this interpreter exits (`hapki lab up` is a short-lived command)."""
        self.procs.detach()

    def _start_galera(self) -> None:
        try:
            self.galera.start()
        finally:
            self._record_data_nodes(self.galera.nodes, "galera", lambda n: n.cnf_path)

    def _start_nats(self) -> None:
        try:
            self.nats.start()
        finally:
            self._record_data_nodes(self.nats.nodes, "nats", lambda n: n.conf_path)

    def _record_data_nodes(self, nodes: list[Any], kind: str, marker: Callable[[Any], Path]) -> None:
        for node in nodes:
            if node.pid is not None:
                self.procs.record(f"{kind}@{node.name}", node.pid, str(marker(node)), node.log_path)

    def _start_front(self) -> None:
        # The HSM token sets: one store each (its own softhsm2.conf); PINs and SO PINs in 0600 files beside them.
        for name, hsm in self.hsms.items():
            hsm.start()
            hsm.init_token(self.token_label(name))
        ca = tls.create_infra_ca(self.tls_dir)
        for tier, t in self.topo.tiers.items():
            pem = tls.issue_server_cert(ca, self.tls_dir, f"{tier}-vip", [str(t.vip)],
                                        [f"{tier}.{self.topo.lab.prefix}.lab"])
            for member in t.members:
                files = render.render_member(self.topo, member, self.member_dir(member), pem)
                self._launch_keepalived(member, files["keepalived.conf"])
                self._launch_haproxy(member, files["haproxy.cfg"])

    def _launch_keepalived(self, member: str, conf: Path) -> None:
        d = self.member_dir(member)
        pid, vrrp_pid = d / "keepalived.pid", d / "keepalived-vrrp.pid"
        # -n: stay in the foreground (the PID we track is keepalived's); -P: VRRP only; -l -D -G: detailed log
        # on stdout, no syslog; own pid files, or two keepalived on one host refuse each other (FIELD-NOTES).
        argv = self.net.exec_argv(member, ["keepalived", "-n", "-P", "-l", "-D", "-G", "-f", str(conf),
                                           "-p", str(pid), "-r", str(vrrp_pid)])
        # keepalived refuses to start over a pid file naming a live (or zombie) process: remove them at each start.
        self.procs.launch(f"keepalived@{member}", argv, d / "keepalived.log", marker=str(conf), pid_files=[vrrp_pid],
                          stale_files=[pid, vrrp_pid])

    def _launch_haproxy(self, member: str, cfg: Path) -> None:
        d = self.member_dir(member)
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], check=False, capture_output=True, text=True)
        if check.returncode != 0:
            raise LabError(f"haproxy config of {member} is invalid: {check.stderr.strip() or check.stdout.strip()}")
        argv = self.net.exec_argv(member, ["haproxy", "-db", "-f", str(cfg)])  # -db: foreground, no daemon
        self.procs.launch(f"haproxy@{member}", argv, d / "haproxy.log", marker=str(cfg))

    # --- service configs ------------------------------------------------------------------------------------

    def _data_tls(self, name: str, address: str) -> TlsFiles:
        """A data-tier node's server certificate (also for dialling its peers: routes, replication, SST)."""
        return TlsFiles.issue(self.tls_dir, name, [address], self.topo.cert_dns_names(name), client_auth=True)

    def _nats_config(self, user: str = "admin") -> NatsConfig:
        """How bus user `user` (admin, clm, cara, watcher, client) reaches the cluster: TLS, its password file."""
        return NatsConfig(servers=self.nats.urls, stream_replicas=len(self.nats.nodes), user=user,
                          password_file=self.bus_users.password_file(user), tls_ca_file=self.ca_bundle)

    def client_nats_config(self) -> NatsConfig:
        """What a client on the host needs to call CLM over the bus (`status --json` names the same files)."""
        return self._nats_config("client")

    def nats_connect_kwargs(self, user: str = "admin") -> dict[str, Any]:
        """nats.connect() keywords for `user` (the lab's own inspection and the tests use admin)."""
        from hapki.runtime.bus import connect_options

        return {"servers": self.nats_urls, **connect_options(self._nats_config(user))}

    def db_ssl_context(self) -> ssl.SSLContext:
        """TLS to the Galera nodes from the host (aiomysql's `ssl=`): the nodes accept nothing else."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def database_config(self, user: str = "hapki") -> DatabaseConfig:
        """How `user` reaches the lab's Galera nodes (every node, in order, over TLS), password from the secrets."""
        port = self.topo.ports.mariadb
        return DatabaseConfig(nodes=[f"{n.address}:{port}" for n in self.galera.nodes], user=user,
                              password_file=self.galera.password_file(user), sync_wait=True,
                              tls_ca_file=self.ca_bundle)

    def _hsm_config(self) -> HSMConfig:
        members = []
        for name, hsm in self.hsms.items():
            label = self.token_label(name)
            # A private copy of libsofthsm2.so per member: each reads its own SOFTHSM2_CONF and fails alone.
            module = stack.private_module(SimpleNamespace(hsm=hsm), name)  # type: ignore[arg-type]
            members.append(HSMMember(name=name, module_path=module, token_label=label, pin_file=hsm.pin_file(label),
                                     softhsm_conf=hsm.conf_path))
        return HSMConfig(members=members)

    def _write_service_configs(self) -> None:
        for hsm in self.hsms.values():
            hsm.start()  # its directory holds the private module copy the CARA config names
        # CLM's approval key pair, as for the single-host stack: CLM members sign with the private key, CARA members
        # trust the public key.
        approval_key, approval_public = stack.approval_keys(self.config_dir)
        for tier, t in self.topo.tiers.items():
            for member in t.members:
                common: dict[str, Any] = {"member": member, "vip": str(t.vip), "nats": self._nats_config(tier),
                                          "http_listen": f"127.0.0.1:{t.backend_port}"}
                if tier == "cara":
                    # Certificates name the VIP's plain-HTTP OCSP and CRL URLs (CDP, AIA).
                    config: CaraConfig | ClmConfig = CaraConfig(
                        **common, database=self.database_config("hapki_cara"), hsm=self._hsm_config(),
                        public_url=self.plain_url(tier), approval_public_keys=[approval_public])
                elif tier == "clm":
                    config = ClmConfig(**common, database=self.database_config("hapki_clm"),
                                       approval_key_file=approval_key)
                else:
                    raise LabError(f"no service known for tier {tier!r}")
                stack.write_config(config, self.service_config_path(member))
                watcher: dict[str, Any] = {"member": member, "tier": tier, "vip": str(t.vip),
                                           "nats": self._nats_config(f"watcher-{member}")}
                if "health_url" in WatcherConfig.model_fields:
                    watcher["health_url"] = f"http://127.0.0.1:{t.backend_port}/health"
                stack.write_config(WatcherConfig(**watcher), self.watcher_config_path(member))  # type: ignore[arg-type]

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAPKI_FAULTS")}
        env.setdefault("HAPKI_TRACE_FILE", str(self.trace_file))
        return env

    # --- CA, services, gate ---------------------------------------------------------------------------------

    def ca(self, command: str, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """`hapki ca <command> <args>` as an operator runs it on the host (it reaches the database through the
        router) with the first CARA member's config: both HSM members, the CARA database user. Output captured."""
        cara = self.topo.members_of_tier("cara")[0]
        argv = [*stack.hapki_command(), "ca", command, "--config", str(self.service_config_path(cara)), *args]
        return subprocess.run(argv, env=self._child_env(), check=False, capture_output=True, text=True,
                              timeout=timeout)

    def _ca_init(self) -> None:
        """`hapki ca init` with both HSM members (Lab.ca)."""
        log_path = self.base_dir / "ca-init.log"
        result = self.ca("init", "--out", str(self.config_dir))
        log_path.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise LabError(f"hapki ca init failed ({result.returncode}); see {log_path}:\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")

    def _ensure_streams(self) -> None:
        """Create the JetStream streams and consumer (R3) from the host, as the services would.

        Over a lab restarted on its old stores, an R3 stream now and then elects no leader at all (seen with
        PKI_HA_EVENTS: the meta leader and the other streams' leaders elected within a second, that stream none in
        30 s; nats-server#6890 and #2673 describe the same). Every API call on it then times out. A restart of the
        servers one by one has always got an election going again, so that is done (at most twice) before failing.
        """
        import nats.errors

        from hapki.runtime import bus

        async def ensure() -> None:
            nc = await bus.connect(self._nats_config(), name="hapki-lab")
            try:
                await bus.ensure_topology(nc.jetstream(timeout=STREAMS_API_TIMEOUT), self._nats_config())
            finally:
                await nc.close()

        for attempt in range(1, STREAMS_ATTEMPTS + 1):
            try:
                asyncio.run(ensure())
                return
            except (nats.errors.TimeoutError, TimeoutError) as exc:
                if attempt == STREAMS_ATTEMPTS:
                    raise LabError(f"JetStream streams not ready after {attempt} attempts and "
                                   f"{attempt - 1} rolling restarts of the NATS servers: {exc!r}") from exc
                log.warning("JetStream streams not ready (%r; a stream without a leader?): restarting the NATS "
                            "servers one by one", exc)
                self._restart_nats_rolling()

    def _restart_nats_rolling(self, timeout: float = 60.0) -> None:
        """Stop and start each NATS server in turn (gracefully), waiting for the cluster's health in between."""
        for node in self.nats.nodes:
            node.stop()
            node.start()
            if wait_until(lambda: all(self._nats_healthy(n) for n in self.nats.nodes), timeout, 0.2) is None:
                raise LabError(f"the NATS cluster is not healthy {timeout:.0f} s after restarting {node.name}")
        self._record_data_nodes(self.nats.nodes, "nats", lambda n: n.conf_path)

    def _service_argv(self, member: str, kind: str, config: Path) -> list[str]:
        # --supervise: a service that dies unasked is forked again at once from a warm interpreter, as deployed.
        return self.net.exec_argv(member, [*stack.hapki_command(), "serve", kind, "--config", str(config),
                                           "--supervise"])

    def _launch_service(self, member: str, kind: str) -> tuple[str, Path, int]:
        """Start `hapki serve <kind>` (cara, clm, watcher) in ``member``'s namespace; return what _wait_ready needs."""
        config = self.watcher_config_path(member) if kind == "watcher" else self.service_config_path(member)
        log_path = self.member_dir(member) / f"{kind}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        name = f"{kind}@{member}"
        self.procs.launch(name, self._service_argv(member, kind, config), log_path, marker=str(config),
                          env=self._child_env())
        return name, log_path, offset

    def _wait_ready(self, started: list[tuple[str, Path, int]], timeout: float) -> None:
        waiting = {name: (log_path, offset) for name, log_path, offset in started}
        deadline = time.monotonic() + timeout
        while waiting:
            for name, (log_path, offset) in list(waiting.items()):
                kind = name.split("@")[0]
                text = log_path.read_text(errors="replace")[offset:] if log_path.exists() else ""
                if f"hapki {kind} ready" in text:
                    del waiting[name]
                elif self.procs.exited(name):
                    raise LabError(f"{name} exited during start; tail of {log_path}:\n{text[-3000:]}")
            if waiting and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{_tail(p, 15, since=o)}" for n, (p, o) in waiting.items())
                raise LabError(f"not ready after {timeout:.0f} s: {', '.join(waiting)}\n{tails}")
            time.sleep(0.05)

    def _start_services(self) -> None:
        started = [self._launch_service(m, kind) for m in self.tier_members()
                   for kind in (str(self.topo.tier_of(m)), "watcher")]
        self._wait_ready(started, SERVICE_READY_TIMEOUT)

    def _gate(self) -> None:
        for tier in self.topo.tiers:
            want = self.preferred(tier)
            if self.wait_vip(tier, want, VIP_TIMEOUT) is None:
                raise LabError(f"the {tier} VIP is on {self.vip_holders(tier)}, not on {want} alone, "
                               f"after {VIP_TIMEOUT:.0f} s")
        for tier in self.topo.tiers:
            result: dict[str, Any] = {}

            def healthy(tier: str = tier, result: dict[str, Any] = result) -> bool:
                result.update(self.https_get(tier, "/health"))
                return result.get("status") == 200

            if wait_until(healthy, HTTPS_TIMEOUT, 0.2) is None:
                raise LabError(f"{self.url(tier)}/health did not answer 200 within {HTTPS_TIMEOUT:.0f} s: {result}")
        # Every member at its full priority (its track script risen) and the VIP (still, or again) at home: before
        # that, a peer whose script rises first takes the VIP for a second (hapki.lab.vrrp).
        for tier in self.topo.tiers:
            self.wait_vrrp_settled(tier, RISE_TIMEOUT)

    def _start_prometheus(self) -> None:
        """Write prometheus.yml, start Debian's prometheus on the host, wait until it is ready."""
        executable = prometheus.binary()
        if executable is None:
            raise LabError("prometheus is not installed (Debian package `prometheus`): run scripts/setup.sh")
        config = self.prometheus_dir / "prometheus.yml"
        data = self.prometheus_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        rules = self.prometheus_dir / compose_layout.ALERT_RULES.name
        shutil.copyfile(compose_layout.ALERT_RULES, rules)  # the lab runs what the repository holds at `up`
        config.write_text(prometheus.render_config(self.topo, rules))
        log_path = self.prometheus_dir / "prometheus.log"
        for attempt in range(1, PROMETHEUS_ATTEMPTS + 1):
            try:
                self._launch_prometheus(executable, config, data, log_path)
                return
            except LabError as exc:
                if attempt == PROMETHEUS_ATTEMPTS:
                    raise
                # A start that really failed: once more. (Before ProcessTable.exited asked twice, a cold start's
                # empty command line was taken for an exit here, and the next attempt stopped the first as stale.)
                log.warning("prometheus start %d failed (%s); starting it again", attempt, exc)
                time.sleep(1.0)

    def _launch_prometheus(self, executable: str, config: Path, data: Path, log_path: Path) -> None:
        _stop_stale_prometheus()
        entry = self.procs.launch("prometheus@host", prometheus.argv(executable, config, data), log_path,
                                  marker=str(config))
        result: dict[str, Any] = {}

        def ready() -> bool:
            if self.procs.exited("prometheus@host"):
                # Asked twice (ProcessTable.exited): once was not enough on a cold start, when loading the binary
                # takes longer, and the next attempt then stopped a running Prometheus as stale.
                seen = (f"pid {entry.pid} {'running' if _pid_running(entry.pid) else 'gone or a zombie'}, "
                        f"command line {_cmdline(entry.pid)[:160]!r}")
                raise LabError(f"prometheus exited during start ({seen}); tail of {log_path}:\n{_tail(log_path, 15)}")
            try:
                with urllib.request.urlopen(f"{self.prometheus_url}/-/ready", timeout=1) as r:
                    result["status"] = r.status
            except (OSError, urllib.error.URLError) as exc:
                result["error"] = str(exc)
            return result.get("status") == 200

        if wait_until(ready, PROMETHEUS_TIMEOUT, 0.2) is None:
            raise LabError(f"prometheus at {self.prometheus_url} not ready after {PROMETHEUS_TIMEOUT:.0f} s: {result}")

    def prometheus_targets(self) -> list[dict[str, Any]]:
        """The active scrape targets as the lab's Prometheus reports them (job, member, health, last error)."""
        body = _http_json(f"{self.prometheus_url}/api/v1/targets?state=active", timeout=3.0)
        return [{"job": t["labels"].get("job"), "member": t["labels"].get("member"), "url": t.get("scrapeUrl"),
                 "health": t.get("health"), "error": t.get("lastError") or None}
                for t in (body.get("data") or {}).get("activeTargets", [])]

    def prometheus_alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing in the lab's Prometheus (compose/prometheus/alerts.yml): name, state,
        severity, summary and the labels that say where; most severe first. Empty when Prometheus does not answer."""
        body = _http_json(f"{self.prometheus_url}/api/v1/alerts", timeout=3.0)
        found = [{"name": a["labels"].get("alertname"), "state": a.get("state"),
                  "severity": a["labels"].get("severity"), "summary": (a.get("annotations") or {}).get("summary"),
                  "labels": {k: v for k, v in a["labels"].items() if k not in ("alertname", "severity")},
                  "since": a.get("activeAt")}
                 for a in (body.get("data") or {}).get("alerts", [])]
        order = {"critical": 0, "warning": 1, "info": 2}
        return sorted(found, key=lambda a: (a["state"] != "firing", order.get(a["severity"], 3), a["name"] or ""))

    # --- down -----------------------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop every recorded process (callers first, Galera last), then remove the namespaces and host veth."""
        require_root()
        self.procs.load()
        for wave in _STOP_WAVES:
            self.procs.stop_many([n for n in self.procs.procs if self.procs.procs[n].kind in wave], timeout=20.0)
        for name in reversed(self.procs.names(kind="galera")):
            self.procs.stop(name, timeout=60.0)
        # Processes this interpreter started through hapki.lab.data: reap them (they are stopped by now).
        for node in [*self.galera.nodes, *self.nats.nodes]:
            with contextlib.suppress(OSError, RuntimeError):
                node.stop()
        try:
            self.net.destroy()  # also stops anything still running inside a lab namespace
        except NetworkError as exc:
            raise LabError(f"removing the lab network failed: {exc}") from exc
        if self.procs.procs or self.procs.meta:
            self.procs.procs.clear()
            self.procs.set_meta(state="down", down_at=time.time())

    # --- faults and observations (for tests and the fault suite) --------------------------------------------

    def vip_holders(self, tier: str) -> list[str]:
        """Members of ``tier`` whose namespace holds the tier's VIP now."""
        return self.net.vip_holders(tier)

    def vrrp_priorities(self, tier: str) -> dict[str, int | None]:
        """The VRRP priority each member of ``tier`` runs with now, from its keepalived log (None: keepalived is
        not running there). Below the member's configured priority: its track script fails, or has not yet risen."""
        priorities: dict[str, int | None] = {}
        for member in self.topo.members_of_tier(tier):
            priorities[member] = None
            if self.procs.alive(f"keepalived@{member}"):
                text = vrrp.since_last_start(vrrp.log_path(self.base_dir, member))
                priorities[member] = vrrp.effective_priority(text, self.topo.members[member].priority or 0)
        return priorities

    def vrrp_unfit(self, tier: str) -> dict[str, str]:
        """Members of ``tier`` not running at their configured VRRP priority, and what they run with."""
        configured = {m: self.topo.members[m].priority for m in self.topo.members_of_tier(tier)}
        return {m: f"VRRP priority {p} of {configured[m]}" if p is not None else "keepalived not running"
                for m, p in self.vrrp_priorities(tier).items() if p != configured[m]}

    def wait_vrrp_settled(self, tier: str, timeout: float, doing: str = "") -> None:
        """Wait until every member of ``tier`` runs at its configured VRRP priority and the VIP is on the preferred
        member alone: from then on the VIP stays put until something fails. LabError (with what keepalived logged)
        after ``timeout``."""
        want = self.preferred(tier)

        def settled() -> bool:
            return not self.vrrp_unfit(tier) and self.vip_holders(tier) == [want]

        if wait_until(settled, timeout, 0.05) is None:
            raise LabError(f"{doing}the {tier} VIP is on {self.vip_holders(tier)}, not on {want} alone with every "
                           f"member at its VRRP priority, after {timeout:.0f} s: {self.vrrp_unfit(tier) or 'all are'}; "
                           f"keepalived:\n{vrrp.vrrp_story(self, tier)}")

    def wait_vip(self, tier: str, member: str | None = None, timeout: float = 5.0) -> float | None:
        """Wait until exactly ``member`` (default: any single member) holds the VIP; seconds taken, or None."""
        def settled() -> bool:
            holders = self.vip_holders(tier)
            return holders == [member] if member else len(holders) == 1
        return wait_until(settled, timeout, 0.005)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """Stop one process gracefully (e.g. `keepalived@cara-1`)."""
        self.procs.stop(name, timeout)

    def crash(self, name: str) -> None:
        """Crash one process and its children (SIGSTOP all, then SIGKILL all)."""
        self.procs.crash(name)

    def start(self, name: str, timeout: float = SERVICE_READY_TIMEOUT) -> None:
        """Start a stopped or crashed process again, as `up()` started it; a service: wait until it is ready."""
        entry = self.procs.procs.get(name)
        if entry is None or not entry.argv:
            raise LabError(f"{name} cannot be restarted here (data tier: use lab.galera / lab.nats)")
        started = self._relaunch(name)
        if started is not None:
            self._wait_ready([started], timeout)

    def _relaunch(self, name: str) -> tuple[str, Path, int] | None:
        """Launch ``name`` again as recorded; for a service, what _wait_ready needs to see it ready."""
        entry = self.procs.procs[name]
        log_path = Path(entry.log)
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.procs.relaunch(name)
        return (name, log_path, offset) if entry.kind in ("cara", "clm", "watcher") else None

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to the main process of ``name`` without waiting (to time what follows from the signal)."""
        pid = self.procs.pid(name)
        if pid is None:
            raise LabError(f"{name} is not running")
        os.kill(pid, sig)

    def kill_data_node(self, name: str) -> float:
        """SIGKILL a data-tier process (`galera@db-1`, `nats@nats-2`); the wall time just before the kill."""
        node = self._data_node(name)
        began = time.time()
        if node.running:
            node.kill()  # our own child: kill and reap
        else:
            self.procs.crash(name)  # started by another process (`hapki lab up`): by PID and marker
        return began

    def start_data_node(self, name: str, timeout: float = 120.0) -> None:
        """Start a killed data-tier process again and wait until it serves: a Galera node from its recovered
        position (IST) until Synced, a NATS server until every server's /healthz is ok."""
        node = self._data_node(name)
        if self.procs.alive(name):
            return
        if isinstance(node, GaleraNode):
            self.restart_galera_nodes([name], timeout, bootstrap_if_stuck=False)
            return
        node.start()
        if wait_until(lambda: all(self._nats_healthy(n) for n in self.nats.nodes), timeout, 0.2) is None:
            raise LabError(f"the NATS cluster is not healthy {timeout:.0f} s after restarting {name}")
        assert node.pid is not None
        self.procs.record(name, node.pid, str(node.conf_path), node.log_path)

    def rebuild_galera_node(self, member: str, timeout: float = 180.0) -> None:
        """Replace Galera node ``member``'s data, as after a lost disk: stop it, empty its datadir, start it empty
        so it joins by a full state transfer (SST, through stunnel) from a running member; wait until Synced."""
        name = f"galera@{member}"
        node = self._data_node(name)
        if not isinstance(node, GaleraNode):
            raise LabError(f"{name} is not a Galera node")
        if node.running:
            node.stop()
        elif self.procs.alive(name):
            self.procs.crash(name)  # started by another process (`hapki lab up`): by PID and marker
        shutil.rmtree(node.datadir, ignore_errors=True)
        node.start(bootstrap=False)
        node.wait_synced(timeout)
        assert node.pid is not None
        self.procs.record(name, node.pid, str(node.cnf_path), node.log_path)

    def restart_galera_nodes(self, names: list[str], timeout: float = 120.0, *, bootstrap_if_stuck: bool = True) -> None:
        """Start killed Galera nodes again, all at once, each from its recovered position, and wait until every
        node is Synced. Started one after the other, the first of several would wait for the others (a node
        that lost its peers waits for the Primary Component before it serves).

        All of them dead: they re-form the Primary Component from their saved view (pc.recovery) once all are
        back. When that cannot happen (a node's view was not saved) and ``bootstrap_if_stuck``, the nodes are
        killed again and the most advanced one bootstraps (GaleraCluster.bootstrap_from_most_advanced, the
        operator's procedure); restart_site() does not: a site that does not come back by itself is a finding.
        """
        nodes = [self._data_node(name) for name in names]
        try:
            with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="galera-restart") as pool:
                list(pool.map(lambda node: node.restart_after_crash(), nodes))  # type: ignore[union-attr]
            for node in nodes:
                node.wait_synced(timeout)  # type: ignore[union-attr]
        except RuntimeError as exc:
            everyone = len(nodes) == len(self.galera.nodes)
            if not (bootstrap_if_stuck and everyone):
                raise LabError(f"Galera nodes {', '.join(names)} did not come back: {exc}") from exc
            log.warning("the Galera nodes did not re-form the cluster by themselves (%s); bootstrapping the most "
                        "advanced one", str(exc)[:300])
            for node in self.galera.nodes:
                node.kill()
                self.procs.crash(f"galera@{node.name}")
            self.galera.bootstrap_from_most_advanced()
        self._record_data_nodes(self.galera.nodes, "galera", lambda n: n.cnf_path)

    def site_processes(self) -> list[str]:
        """Every process of the site: each member's and each data node's (Prometheus, on the host, is not one)."""
        self.procs.load()
        return [name for name, entry in self.procs.procs.items() if entry.kind != "prometheus"]

    def crash_site(self) -> float:
        """The whole site loses power at once: every process of every member and data node is stopped (SIGSTOP:
        none can react to another's death), then SIGKILLed; the wall time just before. What SIGKILL cannot do is
        drop what the kernel has not written to disk yet: see docs/RELIABILITY.md, "The whole site"."""
        return self._crash_together(self.site_processes(), [*self.galera.nodes, *self.nats.nodes])

    def crash_galera_cluster(self) -> float:
        """Every Galera node dies at once (SIGSTOP all, then SIGKILL), the services running on; the wall time
        just before. `restart_galera_nodes` brings them back from their saved view, no bootstrap."""
        return self._crash_together([f"galera@{node.name}" for node in self.galera.nodes], self.galera.nodes)

    def _crash_together(self, names: list[str], data_nodes: list[Any]) -> float:
        """SIGSTOP every process of ``names`` (none can react to another's death), then SIGKILL them."""
        from hapki.cli.procstat import with_descendants

        pids = with_descendants(pid for name in names for pid in self.procs.pids(name))
        began = time.time()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        for node in data_nodes:
            if node.running:
                node.kill()  # our own child: reap it
        if wait_until(lambda: not any(self.procs.alive(n) for n in names), 10.0, 0.02) is None:
            raise LabError(f"still alive after SIGKILL: {[n for n in names if self.procs.alive(n)]}")
        return began

    def restart_site(self, timeout: float = 180.0) -> dict[str, float]:
        """Power is back: every member boots and starts its units at once, in no order, as after `crash_site()`.

        Each Galera node starts from its recovered position (`--wsrep-recover`, what Debian's unit does with
        galera_recovery) and none bootstraps: the nodes re-form the Primary Component from their saved view
        (gvwstate.dat, Galera's pc.recovery) once all of them are back. The NATS servers recover their streams
        from disk; keepalived, haproxy, the services and watchers start meanwhile and wait for what they need.
        Returns the seconds from the start to each tier being back (galera, nats, services, vips).
        """
        began = time.monotonic()
        took: dict[str, float] = {}

        def galera() -> None:
            self.restart_galera_nodes([f"galera@{node.name}" for node in self.galera.nodes], timeout,
                                      bootstrap_if_stuck=False)
            took["galera"] = round(time.monotonic() - began, 2)

        def nats() -> None:
            for node in self.nats.nodes:
                node.start()
            self._record_data_nodes(self.nats.nodes, "nats", lambda n: n.conf_path)
            if wait_until(lambda: all(self._nats_healthy(n) for n in self.nats.nodes), timeout, 0.2) is None:
                raise LabError(f"the NATS cluster is not healthy {timeout:.0f} s after the site restarted")
            took["nats"] = round(time.monotonic() - began, 2)

        def members() -> None:
            launched = [self._relaunch(name) for name in self.site_processes()
                        if self.procs.procs[name].argv and not self.procs.alive(name)]
            self._wait_ready([started for started in launched if started is not None], timeout)
            took["services"] = round(time.monotonic() - began, 2)

        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="site") as pool:
            futures = [pool.submit(galera), pool.submit(nats), pool.submit(members)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise LabError(f"the site did not come back: {errors[0]}") from errors[0]
        for tier in self.topo.tiers:
            self.wait_vrrp_settled(tier, timeout, doing="restarting the site: ")
        took["vips"] = round(time.monotonic() - began, 2)
        return took

    def _data_node(self, name: str) -> GaleraNode | NatsClusterNode:
        kind, _, member = name.partition("@")
        nodes: list[Any] = {"galera": self.galera.nodes, "nats": self.nats.nodes}.get(kind, [])
        for node in nodes:
            if node.name == member:
                return node  # type: ignore[no-any-return]
        raise LabError(f"{name} is not a data-tier process (galera@db-N or nats@nats-N)")

    def _nats_healthy(self, node: NatsClusterNode) -> bool:
        return _http_json(f"http://{node.address}:{node.monitor_port}/healthz").get("status") == "ok"

    def hsm_down(self, hsm: str) -> None:
        """Make one HSM member fail for every process: its token directory disappears (SoftHSM re-reads it)."""
        tokens = self.hsms[hsm].token_dir
        if tokens.exists():
            tokens.rename(tokens.with_name("tokens.dead"))

    def hsm_up(self, hsm: str) -> None:
        dead = self.hsms[hsm].token_dir.with_name("tokens.dead")
        if dead.exists():
            dead.rename(self.hsms[hsm].token_dir)

    def set_fail_points(self, name: str, spec: str | None, arm_file: Path | None = None,
                        timeout: float = SERVICE_READY_TIMEOUT) -> None:
        """(Re)start service ``name`` with HAPKI_FAULTS=``spec`` (None: clean); a dead one is just started.

        With ``arm_file``, the points act only while that file exists (hapki.runtime.faults). `heal()` restarts
        any service still running with fail points, clean.
        """
        entry = self.procs.procs[name]
        env = {k: v for k, v in (entry.env or self._child_env()).items() if not k.startswith("HAPKI_FAULTS")}
        if spec:
            env["HAPKI_FAULTS"] = spec
            if arm_file is not None:
                env["HAPKI_FAULTS_ARM_FILE"] = str(arm_file)
        self._restart_with(name, env, timeout)

    def set_env(self, name: str, updates: Mapping[str, str | None], timeout: float = SERVICE_READY_TIMEOUT) -> None:
        """(Re)start service ``name`` with these environment variables (None: removed), e.g.
        HAPKI_SIGNER_PROCESSES; a dead one is just started. They stay (heal() keeps them) until set again."""
        entry = self.procs.procs[name]
        env = dict(entry.env or self._child_env())
        for key, value in updates.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self._restart_with(name, env, timeout)

    def restart(self, name: str, env: Mapping[str, str | None] | None = None,
                timeout: float = SERVICE_READY_TIMEOUT) -> float:
        """Restart one process of the running lab gracefully (`clm@clm-2`, `keepalived@cara-1`), a service with
        these environment changes (set_env; None values removed, the rest kept for good); the seconds it took.

        `hapki lab restart`: measuring one service before and after a change, or taking a new build, without
        rebuilding the lab (`up` builds everything again). A service is ready when this returns. The data tier
        restarts through its own starters (start_data_node), not here: LabError, as for a name the lab lacks.
        """
        began = time.monotonic()
        self.procs.load()  # another command (`hapki lab up`) started it
        entry = self.procs.procs.get(name)
        if entry is None:
            raise LabError(f"the lab has no process {name}; it has {', '.join(sorted(self.procs.procs)) or 'none'}")
        if not entry.argv:
            raise LabError(f"{name} is a data-tier node: kill it and start it again (Lab.kill_data_node, "
                           "start_data_node), it rejoins by its own state transfer")
        if entry.kind in ("cara", "clm", "watcher"):
            self.set_env(name, env or {}, timeout)
        elif env:
            raise LabError(f"{name}: only a service (cara, clm, watcher) takes environment changes")
        else:
            self.stop(name)
            self.start(name, timeout)
        return time.monotonic() - began

    def _restart_with(self, name: str, env: dict[str, str], timeout: float) -> None:
        self.procs.stop(name)
        self.procs.procs[name].env = env
        self.procs.save()
        self.start(name, timeout)

    def heal(self, vip_timeout: float = 30.0, data_timeout: float = 120.0) -> None:
        """Undo every fault a test or the fault suite may have left, then wait for the VIPs to be back home (and
        every tier member at its VRRP priority).

        Network blocks and VRRP blocks removed, cut links restored, dead HSM members back, killed Galera and NATS
        nodes restarted (Galera until Synced), a NATS server whose signing-stream replica does not catch up
        restarted (`_restart_stuck_replicas`), services running with fail points restarted clean, every stopped
        or crashed process started again, each VIP on its preferred member and every track script risen.
        """
        self.procs.load()
        self.net.clear_faults()
        for member in self.topo.members:
            self.net.restore_link(member)
        for hsm in self.hsms:
            self.hsm_up(hsm)
        dead = [name for name in self.procs.names(kind="galera") if not self.procs.alive(name)]
        if dead:
            self.restart_galera_nodes(dead, data_timeout)
        for name in self.procs.names(kind="nats"):
            if not self.procs.alive(name):
                self.start_data_node(name, data_timeout)
        self._restart_stuck_replicas()
        for name, entry in list(self.procs.procs.items()):
            faulty = entry.argv and any(k.startswith("HAPKI_FAULTS") for k in (entry.env or {}))
            if faulty:
                self.set_fail_points(name, None)
            elif entry.argv and not self.procs.alive(name):
                self.start(name)
        for tier in self.topo.tiers:
            self.wait_vrrp_settled(tier, vip_timeout, doing="healing: ")

    def steady(self) -> dict[str, Any]:
        """What is not yet as `up()` left it (empty = steady): Galera nodes not Synced/Primary with all members,
        NATS servers not healthy, a VIP away from home, a tier member below its VRRP priority (a track script
        failing or not yet risen: the VIP may still move), the preferred CARA member not signing."""
        problems: dict[str, Any] = {}
        size = len(self.galera.nodes)
        for node in self.galera.nodes:
            st = self._galera_status(node)
            if not (st.get("wsrep_local_state_comment") == "Synced" and st.get("wsrep_cluster_status") == "Primary"
                    and st.get("wsrep_cluster_size") == size and st.get("wsrep_ready") == "ON"):
                problems[f"galera@{node.name}"] = st
        for node in self.nats.nodes:
            if not self._nats_healthy(node):
                problems[f"nats@{node.name}"] = "not healthy"
        if not any(name.startswith("nats@") for name in problems):
            lagging = self.signing_stream_lagging()
            if lagging:
                problems["PKI_SIGNING replicas"] = lagging
        for tier in self.topo.tiers:
            if self.vip_holders(tier) != [self.preferred(tier)]:
                problems[f"{tier} VIP"] = self.vip_holders(tier)
            unfit = self.vrrp_unfit(tier)
            if unfit:
                problems[f"{tier} VRRP priority"] = unfit
        cara = self.preferred("cara")
        body = self.member_health(cara).get("body")
        if not (isinstance(body, dict) and body.get("active")):
            problems[f"cara@{cara}"] = body
        return problems

    def signing_stream_lagging(self) -> str | None:
        """Why the signing stream is not whole (no leader, a replica not current), or None. A server's /healthz
        can pass between the retries of a replica still catching up after a partition (nats-server logs "Expected
        first catchup entry to be a snapshot and peerstate, will retry"): a fault run begun then was a double fault
        (session 24)."""
        problem, behind = self._signing_replicas()
        return problem or (f"not current: {', '.join(behind)}" if behind else None)

    def _signing_replicas(self) -> tuple[str | None, list[str]]:
        """(why the signing stream cannot be read, or None; the servers whose replica of it is not current)."""
        import nats
        import nats.errors

        from hapki.contracts import subjects

        async def read() -> tuple[str | None, list[str]]:
            nc = await nats.connect(**self.nats_connect_kwargs(), connect_timeout=2, allow_reconnect=False)
            try:
                info = await nc.jetstream(timeout=2).stream_info(subjects.SIGNING_STREAM)
                if info.cluster is None or not info.cluster.leader:
                    return "no leader", []
                return None, [str(r.name) for r in info.cluster.replicas or [] if not r.current or r.offline]
            finally:
                await nc.close()

        try:
            return asyncio.run(read())
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return f"{type(exc).__name__}: {exc}", []

    def _restart_stuck_replicas(self, patience: float = CATCHUP_PATIENCE_SECONDS) -> list[str]:
        """Restart the NATS servers whose replica of the signing stream is still not current after ``patience``
        seconds; return their names. After a partition nats-server 2.15 retried a replica's catch-up for minutes
        ("Expected first catchup entry to be a snapshot and peerstate, will retry", /healthz failing; session 24),
        and a restart of that server caught it up in about 6 s: the operator's remedy, applied by `heal()`."""
        deadline = time.monotonic() + patience
        while True:
            problem, behind = self._signing_replicas()
            if problem is not None or not behind:
                return []  # whole, or unreadable (no leader yet): `wait_steady` says which
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        log.warning("replicas of the signing stream on %s still not current after %.0f s: restarting them",
                    ", ".join(behind), patience)
        for server in behind:
            self.kill_data_node(f"nats@{server}")
            self.start_data_node(f"nats@{server}")
        return behind

    def wait_steady(self, timeout: float = 60.0) -> None:
        """Wait until `steady()` reports nothing; LabError naming what is not steady after ``timeout``."""
        last: dict[str, Any] = {}

        def settled() -> bool:
            last.clear()
            last.update(self.steady())
            return not last

        if wait_until(settled, timeout, 0.2) is None:
            raise LabError(f"the lab is not steady after {timeout:.0f} s: {last}")

    def reachable(self) -> bool:
        """True if the host's link and route into the lab exist (without them, lab addresses would be sent to
        the host's default route, out of this host: nothing may address them then)."""
        return Path(f"/sys/class/net/{self.topo.host_interface}").exists() and self.net.exists()

    def https_get(self, tier: str, path: str, timeout: float = 3.0) -> dict[str, Any]:
        """GET ``path`` through ``tier``'s VIP from the host, TLS verified against the infra CA."""
        if not self.reachable():
            return {"status": None, "error": "the lab network is down"}
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        try:
            with urllib.request.urlopen(self.url(tier) + path, timeout=timeout, context=context) as r:
                return {"status": r.status, "body": _json_or_text(r.read())}
        except urllib.error.HTTPError as exc:
            return {"status": exc.code, "body": _json_or_text(exc.read())}
        except (OSError, ssl.SSLError) as exc:
            return {"status": None, "error": str(exc)}

    def member_health(self, member: str, timeout: float = 3.0) -> dict[str, Any]:
        """The local service's /health inside ``member``'s namespace (127.0.0.1:backend_port)."""
        tier = self.topo.tier_of(member)
        if tier is None:
            raise LabError(f"{member} runs no HTTP service")
        port = self.topo.tiers[tier].backend_port
        try:
            out = self.net.run_in(member, ["curl", "-s", "--max-time", str(timeout), "-w", "\n%{http_code}",
                                           f"http://127.0.0.1:{port}/health"], check=False, timeout=timeout + 2)
        except subprocess.TimeoutExpired:
            return {"status": None, "error": "timeout"}
        body, _, code = out.rpartition("\n")
        return {"status": int(code) if code.isdigit() and code != "000" else None, "body": _json_or_text(body)}

    # --- status ---------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Members and their processes, VIP holders, Galera, NATS and the signing stream, HSM members, URLs."""
        self.procs.load()
        present = set(self.net.topo.namespaces()) & set(list_namespaces())
        reachable = self.reachable()
        down: dict[str, Any] = {"up": False}
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="lab-status") as pool:
            galera_f = {n.name: pool.submit(self._galera_status, n) for n in self.galera.nodes}
            nats_f = {n.name: pool.submit(self._nats_node_status, n) if reachable else None for n in self.nats.nodes}
            stream_f = pool.submit(self._stream_status) if reachable else None
            health_f = {m: pool.submit(self.member_health, m) for m in self.tier_members()
                        if self.topo.namespace(m) in present}
            vip_f = {t: pool.submit(self.vip_holders, t) for t in self.topo.tiers}
        members: dict[str, Any] = {}
        for member in self.topo.members:
            ns = self.topo.namespace(member)
            members[member] = {
                "namespace": ns, "up": ns in present, "address": str(self.topo.address(member)),
                "processes": {self.procs.procs[n].kind: {"pid": self.procs.procs[n].pid, "alive": self.procs.alive(n)}
                              for n in self.procs.names(member=member)},
            }
        health = {m: f.result() for m, f in health_f.items()}
        hsm = {m: h["body"].get("hsm") for m, h in health.items()
               if self.topo.tier_of(m) == "cara" and isinstance(h.get("body"), dict)}
        return {
            "base_dir": str(self.base_dir),
            "state": self.procs.meta.get("state", "down"),
            "timings": self.procs.meta.get("timings", {}),
            "network": {"router": self.topo.router_namespace in present, "reachable": reachable,
                        "host_link": Path(f"/sys/class/net/{self.topo.host_interface}").exists()},
            "members": members,
            "tiers": {t: {"vip": str(self.topo.vip(t)), "holders": f.result(), "preferred": self.preferred(t),
                          "unfit": self.vrrp_unfit(t)}
                      for t, f in vip_f.items()},
            "galera": {n: f.result() for n, f in galera_f.items()},
            "nats": {"nodes": {n: f.result() if f else dict(down, healthy=False, routes=0, meta_leader=None)
                               for n, f in nats_f.items()},
                     "streams": stream_f.result() if stream_f else {}},
            "health": health,
            "hsm": hsm,
            "prometheus": {"url": self.prometheus_url, "alive": self.procs.alive("prometheus@host"),
                           "config": str(self.prometheus_dir / "prometheus.yml")},
            "alerts": self.prometheus_alerts() if self.procs.alive("prometheus@host") else [],
            # What an outside client needs: the bus as user `client` (TLS: ca_bundle also signs the NATS servers).
            "client": {"nats_urls": self.nats_urls, "nats_user": "client",
                       "nats_password_file": str(self.bus_users.password_file("client")),
                       "clm_url": self.url("clm"), "cara_url": self.url("cara"),
                       "revocation_url": self.plain_url("cara"),  # OCSP <url>/ocsp, CRLs <url>/crl/<issuer>.crl
                       "ca_bundle": str(self.ca_bundle), "hapki_root": str(self.hapki_root),
                       "prometheus_url": self.prometheus_url},
        }

    def _galera_status(self, node: GaleraNode) -> dict[str, Any]:
        if not self.procs.alive(f"galera@{node.name}"):
            return {"up": False}
        try:
            out = node.sql("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_cluster_size', "
                           "'wsrep_local_state_comment', 'wsrep_cluster_status', 'wsrep_last_committed')", timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return {"up": False, "error": str(exc)}
        st: dict[str, Any] = {"up": True}
        for line in out.splitlines():
            key, _, value = line.partition("\t")
            st[key.lower()] = int(value) if value.isdigit() else value
        return st

    def _nats_node_status(self, node: NatsClusterNode) -> dict[str, Any]:
        base = f"http://{node.address}:{node.monitor_port}"
        varz, jsz = _http_json(f"{base}/varz"), _http_json(f"{base}/jsz")
        health = _http_json(f"{base}/healthz")
        return {"up": bool(varz), "healthy": health.get("status") == "ok", "routes": varz.get("routes", 0),
                "meta_leader": (jsz.get("meta_cluster") or {}).get("leader")}

    def _stream_status(self) -> dict[str, Any]:
        """Replica state of the streams, read with nats-py from the host (in a thread: callers may be async)."""
        from hapki.contracts import subjects

        async def read() -> dict[str, Any]:
            import nats

            streams: dict[str, Any] = {}
            nc = await nats.connect(**self.nats_connect_kwargs(), connect_timeout=1, max_reconnect_attempts=1,
                                    allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=2)
                for name in (subjects.SIGNING_STREAM, subjects.HA_EVENTS_STREAM, subjects.EXPIRY_STREAM):
                    try:
                        info = await js.stream_info(name)
                    except Exception as exc:  # noqa: BLE001 - a status report shows every failure as text
                        streams[name] = {"error": f"{type(exc).__name__}: {exc}"}
                        continue
                    cluster = info.cluster
                    streams[name] = {
                        "messages": info.state.messages,
                        "replicas": info.config.num_replicas,
                        "leader": cluster.leader if cluster else None,
                        "followers": [{"name": r.name, "current": r.current, "lag": r.lag}
                                      for r in (cluster.replicas or [])] if cluster else [],
                    }
            finally:
                await nc.close()
            return streams

        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                return pool.submit(asyncio.run, read()).result(timeout=10)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}


def format_status(st: dict[str, Any]) -> str:
    """A human-readable summary of `Lab.status()`."""
    lines = [f"lab {st['state']} in {st['base_dir']}"]
    for tier, t in st["tiers"].items():
        holders = ", ".join(t["holders"]) or "nobody"
        flag = "" if t["holders"] == [t["preferred"]] else f"  (preferred: {t['preferred']})"
        lines.append(f"  {tier} VIP {t['vip']}: held by {holders}{flag}")
        for member, priority in t.get("unfit", {}).items():
            lines.append(f"    {member}: {priority} (its track script fails or is still rising)")
    for name, m in st["members"].items():
        procs = " ".join(f"{k}:{'up' if p['alive'] else 'DOWN'}" for k, p in m["processes"].items()) or "-"
        health = st["health"].get(name)
        extra = f"  /health {health.get('status')}" if health else ""
        lines.append(f"  {name:8} {m['address']:13} {'netns' if m['up'] else 'NO NETNS'}  {procs}{extra}")
    for name, g in st["galera"].items():
        lines.append(f"  galera {name}: " + (f"{g.get('wsrep_local_state_comment')} {g.get('wsrep_cluster_status')} "
                                              f"size {g.get('wsrep_cluster_size')}" if g.get("up") else "down"))
    nats = st["nats"]
    for name, n in nats["nodes"].items():
        lines.append(f"  nats {name}: " + (f"{'healthy' if n['healthy'] else 'UNHEALTHY'}, meta leader "
                                            f"{n['meta_leader']}" if n["up"] else "down"))
    for name, s in nats["streams"].items():
        if isinstance(s, dict) and "leader" in s:
            current = [f"{r['name']}{'' if r['current'] else ' (behind)'}" for r in s["followers"]]
            lines.append(f"  stream {name}: R{s['replicas']}, leader {s['leader']}, followers "
                         f"{', '.join(current) or 'none'}, {s['messages']} messages")
        else:
            lines.append(f"  stream {name}: {s}")
    for member, hsm in st["hsm"].items():
        states = ", ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in (hsm or {}).items())
        lines.append(f"  HSM seen by {member}: {states}")
    c = st["client"]
    lines += [f"  NATS: {','.join(c['nats_urls'])} (TLS; user {c['nats_user']}, password in {c['nats_password_file']})",
              f"  CLM:  {c['clm_url']}   CARA: {c['cara_url']}",
              f"  OCSP and CRLs: {c['revocation_url']}/ocsp, {c['revocation_url']}/crl/<issuer>.crl",
              f"  TLS CA bundle: {c['ca_bundle']}   hapki root: {c['hapki_root']}",
              f"  Prometheus: {c['prometheus_url']} ({'up' if st['prometheus']['alive'] else 'DOWN'}; "
              f"config {st['prometheus']['config']})"]
    alerts = st.get("alerts", [])
    lines.append(f"  alerts: {len(alerts) or 'none'} pending or firing" + (":" if alerts else ""))
    for a in alerts:
        where = " ".join(f"{k}={v}" for k, v in sorted(a["labels"].items()) if k not in ("job", "instance", "tier"))
        lines.append(f"    {a['state']:7} {a['severity'] or '-':8} {a['name']}: {a['summary'] or ''}"
                     + (f"  [{where}]" if where else ""))
    return "\n".join(lines)


def _json_or_text(raw: bytes | str) -> Any:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except ValueError:
        return text


def _http_json(url: str, timeout: float = 1.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}



def _stop_stale_prometheus(timeout: float = 10.0, address: str = prometheus.LISTEN) -> None:
    """SIGTERM a lab Prometheus left by an earlier run (any lab directory): it would hold the lab's port.

    Only processes whose command line is a lab Prometheus's (listen `address` and a `prometheus/prometheus.yml`
    config) are touched. One that exits is gone even while it stays a zombie: one this process started (an
    earlier attempt of `_start_prometheus`) is reaped only by its Popen, and waiting for it cost the whole timeout.
    """
    listen = f"--web.listen-address={address}"
    stale = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if listen in args and any(a.startswith("--config.file=") and a.endswith("prometheus/prometheus.yml")
                                  for a in args):
            stale.append(int(entry.name))
    for pid in stale:
        log.warning("stopping a lab Prometheus left by an earlier run (pid %d)", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while stale and time.monotonic() < deadline:
        stale = [pid for pid in stale if _pid_running(pid)]
        time.sleep(0.1)
