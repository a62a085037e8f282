"""The lab's Prometheus: every service of every member is a healthy target, and the HA figures are right."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from typing import Any

import pytest
from hapki.lab import stack
from hapki.lab.cluster import wait_until
from hapki.lab.ha import Lab

pytestmark = pytest.mark.lab

SCRAPE_WAIT = 20.0  # seconds: a few scrape intervals (2 s) after `up`


def query(lab: Lab, promql: str) -> list[dict[str, Any]]:
    url = f"{lab.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_every_service_of_every_member(lab: Lab) -> None:
    expected = {(kind, member) for member in lab.tier_members()
                for kind in (str(lab.topo.tier_of(member)), "watcher")}
    seen: dict[tuple[str, str], Any] = {}

    def all_up() -> bool:
        seen.clear()
        seen.update({(t["job"], t["member"]): t for t in lab.prometheus_targets()})
        return set(seen) == expected and all(t["health"] == "up" for t in seen.values())

    assert wait_until(all_up, SCRAPE_WAIT, 0.5) is not None, seen
    assert len(expected) == 8


def test_prometheus_sees_one_active_member_per_tier(lab: Lab) -> None:
    def one_each() -> bool:
        active = query(lab, "sum by (pki_tier) (hapki_ha_active)")
        return {r["metric"]["pki_tier"]: float(r["value"][1]) for r in active} == {"cara": 1.0, "clm": 1.0}

    assert wait_until(one_each, SCRAPE_WAIT, 0.5) is not None, query(lab, "hapki_ha_active")
    # The signer of the preferred member only. Waited for too: each target is scraped on its own, so right after a
    # test moved the VIP back home the standby's last sample can still be from before it stepped down.
    standby = next(m for m in lab.topo.members_of_tier("cara") if m != lab.preferred("cara"))

    def signers() -> dict[str, float]:
        return {r["metric"]["pki_member"]: float(r["value"][1]) for r in query(lab, "hapki_cara_signer_active")}

    assert wait_until(lambda: signers() == {lab.preferred("cara"): 1.0, standby: 0.0}, SCRAPE_WAIT, 0.5) is not None, \
        signers()
    # Every Galera node Synced (wsrep_local_state 4) as each CARA member sees it.
    states = query(lab, 'hapki_db_node_wsrep_local_state{job="cara"}')
    assert len(states) == 2 * len(lab.galera.nodes) and {float(r["value"][1]) for r in states} == {4.0}


def test_lab_status_names_the_prometheus_url(lab: Lab) -> None:
    result = subprocess.run([*stack.hapki_command(), "lab", "status", "--json", "--dir", str(lab.base_dir)],
                            capture_output=True, text=True, timeout=60, check=True)
    status = json.loads(result.stdout)
    assert status["client"]["prometheus_url"] == lab.prometheus_url
    assert status["prometheus"]["alive"] is True
    with urllib.request.urlopen(f"{status['client']['prometheus_url']}/-/ready", timeout=5) as response:
        assert response.status == 200
