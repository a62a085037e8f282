"""The lab's Prometheus: Debian's `prometheus` on the host, scraping every service of every CARA and CLM member,
with the site's alerting rules (compose/prometheus/alerts.yml; http://127.0.0.1:9190/alerts).

The host is the lab's client (compose/topology.toml): the flows `host -> segment:cara` (9101 CARA, 9103 watcher)
and `host -> segment:clm` (9102 CLM, 9103 watcher) let it reach each member's /metrics through the router.
It listens on 127.0.0.1 only (LISTEN): a browser on this host, `hapki lab status` and the lab tests read it there.
Config and data live under `<lab dir>/prometheus/`; the process is one of the lab's (`prometheus@host` in the
ProcessTable), so `hapki lab down` stops it and `up` starts it again over the data it left (the TSDB reopens).

Every target carries `member` and `tier` labels besides the services' own attributes, so a dashboard can tell
members apart even for figures a service does not label with its member.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from hapki.lab.topology import Topology
from hapki.runtime.metrics import PORTS

__all__ = ["LISTEN", "SCRAPE_SECONDS", "argv", "render_config", "targets"]

LISTEN = "127.0.0.1:9190"  # not 9090: Debian's package starts a system Prometheus there on a normal host
SCRAPE_SECONDS = 2  # the lab's failovers take well under a second; 2 s keeps them visible at little cost


def targets(topo: Topology) -> dict[str, list[tuple[str, str, str]]]:
    """Scrape job (cara, clm, watcher) -> (address:port, member, tier) of every service in every tier member."""
    jobs: dict[str, list[tuple[str, str, str]]] = {"cara": [], "clm": [], "watcher": []}
    for tier in topo.tiers:
        for member in topo.members_of_tier(tier):
            address = topo.address(member)
            jobs[tier].append((f"{address}:{PORTS[tier]}", member, tier))
            jobs["watcher"].append((f"{address}:{PORTS['watcher']}", member, tier))
    return jobs


def render_config(topo: Topology, rules: Path | None = None) -> str:
    """prometheus.yml for the lab: one job per service kind, a static target per member; `rules`: the alerting
    rules file to load (the lab copies compose/prometheus/alerts.yml beside this file)."""
    config = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": f"{SCRAPE_SECONDS}s",
                   "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        **({"rule_files": [str(rules)]} if rules is not None else {}),
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics",
             "static_configs": [{"targets": [target], "labels": {"member": member, "tier": tier}}
                                for target, member, tier in job_targets]}
            for job, job_targets in targets(topo).items()
        ],
    }
    return "# Rendered by hapki.lab.prometheus from compose/topology.toml; rewritten at every `hapki lab up`.\n" + \
        yaml.safe_dump(config, sort_keys=False)


def binary() -> str | None:
    """The prometheus executable, or None when it is not installed (scripts/setup.sh installs it)."""
    return shutil.which("prometheus")


def argv(executable: str, config: Path, data: Path) -> list[str]:
    """The command line of the lab's Prometheus (the config path doubles as the process-table marker)."""
    return [executable, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address={LISTEN}", "--storage.tsdb.retention.time=7d", "--log.level=warn",
            "--web.enable-lifecycle"]
