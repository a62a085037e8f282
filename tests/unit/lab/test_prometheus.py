"""The lab's prometheus.yml: every service of every tier member is a target, on a port the flows open to the host."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from hapki.cara.config import CaraConfig
from hapki.clm.config import ClmConfig
from hapki.lab import prometheus
from hapki.lab.topology import default
from hapki.runtime.metrics import PORTS
from hapki.watcher.main import WatcherConfig


def _scraped() -> set[tuple[str, str, str]]:
    config = yaml.safe_load(prometheus.render_config(default()))
    return {(job["job_name"], static["labels"]["member"], target)
            for job in config["scrape_configs"] for static in job["static_configs"] for target in static["targets"]}


def test_every_service_of_every_tier_member_is_scraped() -> None:
    topo = default()
    expected = set()
    for tier in topo.tiers:
        for member in topo.members_of_tier(tier):
            address = topo.address(member)
            expected |= {(tier, member, f"{address}:{PORTS[tier]}"), ("watcher", member, f"{address}:{PORTS['watcher']}")}
    assert _scraped() == expected
    assert len(expected) == 8


def test_the_services_listen_on_the_scraped_ports_by_default() -> None:
    # The lab writes service configs with the default MetricsConfig: the ports must be the ones scraped.
    for model, service in ((CaraConfig, "cara"), (ClmConfig, "clm"), (WatcherConfig, "watcher")):
        listen = model.model_fields["metrics"].default.listen
        assert listen == f"0.0.0.0:{PORTS[service]}", (service, listen)


def test_the_flows_let_the_host_reach_every_target() -> None:
    topo = default()
    for _job, _member, target in _scraped():
        host, port = target.rsplit(":", 1)
        allowed = [flow for flow in topo.flows if flow.from_ == "host" and int(port) in flow.tcp
                   and IPv4Address(host) in topo.endpoint(flow.to)]
        assert allowed, f"no flow lets the host scrape {target}"


def test_prometheus_listens_on_loopback_only() -> None:
    assert prometheus.LISTEN.startswith("127.0.0.1:")
    argv = prometheus.argv("prometheus", Path("/x/prometheus.yml"), Path("/x/data"))
    assert f"--web.listen-address={prometheus.LISTEN}" in argv
    assert "--config.file=/x/prometheus.yml" in argv  # the process table's marker


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rendered_config(tmp_path: Path) -> None:
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus.render_config(default()))
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stale_lab_prometheus_that_exits_is_not_waited_for_while_it_is_a_zombie(tmp_path: Path) -> None:
    """An earlier attempt's Prometheus is this process's child: once stopped it stays a zombie until its Popen reaps
    it. The wait used to take that for a process still running and sat out its whole timeout (10 s per lab up)."""
    import sys
    import time

    from hapki.lab import ha

    address = "127.0.0.1:1"  # not the lab's: a Prometheus of a lab that is up stays untouched
    config = tmp_path / "prometheus" / "prometheus.yml"
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",  # its argv, as Prometheus's
                                 f"--config.file={config}", f"--web.listen-address={address}"])
    try:
        time.sleep(0.3)
        began = time.monotonic()
        ha._stop_stale_prometheus(timeout=5.0, address=address)  # noqa: SLF001
        assert time.monotonic() - began < 2.0
        assert stand_in.wait(timeout=1.0) != 0  # it got the SIGTERM (and was a zombie until this wait)
    finally:
        stand_in.kill()
        stand_in.wait()
