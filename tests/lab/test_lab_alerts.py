"""The site's alerting rules (compose/prometheus/alerts.yml) in the lab's Prometheus, against real faults: loaded
and evaluating, quiet on the healthy lab, and firing where a fault is (an HSM member gone: warning, with the
member and the HSM named; a service stopped: pending within seconds, naming it). The rules' logic case by case:
tests/unit/runtime/test_alerts.py (promtool)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from typing import Any

import pytest
from hapki.lab import stack
from hapki.lab.cluster import wait_until
from hapki.lab.compose_layout import ALERT_RULES
from hapki.lab.ha import Lab

pytestmark = pytest.mark.lab

# Alerts on the lab's present state only (no rate over minutes that an earlier test's faults may still fill).
STATE_ALERTS = {"HapkiNoActiveSigner", "HapkiTwoActiveSigners", "HapkiNoActiveMember", "HapkiVipOnTwoMembers",
                "HapkiServiceDown", "HapkiHsmMemberDown", "HapkiDatabaseNodeDown", "HapkiGaleraDegraded",
                "HapkiSigningIntentUnresolved", "HapkiMembersIssueFromDifferentCas"}
QUIET_WAIT = 30.0  # after the fixture healed an earlier test's fault: a few scrapes and evaluations (2 s each)
FIRING_WAIT = 60.0  # HapkiHsmMemberDown's `for` is 30 s


def api(lab: Lab, path: str) -> Any:
    with urllib.request.urlopen(f"{lab.prometheus_url}/api/v1/{path}", timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def active(lab: Lab) -> list[dict[str, Any]]:
    """Alerts pending or firing now."""
    return list(api(lab, "alerts")["alerts"])


def test_the_lab_evaluates_the_repository_rules(lab: Lab) -> None:
    loaded = (lab.prometheus_dir / ALERT_RULES.name).read_text()
    assert loaded == ALERT_RULES.read_text()
    rules = [rule for group in api(lab, "rules")["groups"] for rule in group["rules"]]
    names = {rule["name"] for rule in rules if rule["type"] == "alerting"}
    assert STATE_ALERTS <= names and len(names) >= 15

    def evaluated() -> bool:  # each rule evaluated once at least, without an error
        current = [rule for group in api(lab, "rules")["groups"] for rule in group["rules"]]
        return all(rule["health"] == "ok" for rule in current)

    assert wait_until(evaluated, QUIET_WAIT, 0.5) is not None, [(r["name"], r["health"], r.get("lastError"))
                                                                for r in rules]


def test_a_healthy_lab_raises_no_alert_on_its_state(lab: Lab) -> None:
    def quiet() -> bool:
        return not [a for a in active(lab) if a["labels"]["alertname"] in STATE_ALERTS]

    assert wait_until(quiet, QUIET_WAIT, 0.5) is not None, active(lab)


def test_a_dead_hsm_member_fires_its_alert_naming_it(lab: Lab) -> None:
    hsm = sorted(lab.hsms)[-1]
    lab.hsm_down(hsm)  # healed by the fixture

    def hsm_alerts(state: str) -> set[tuple[str, str]]:
        return {(a["labels"]["member"], a["labels"]["hsm_member"]) for a in active(lab)
                if a["labels"]["alertname"] == "HapkiHsmMemberDown" and a["state"] == state}

    cara = set(lab.topo.members_of_tier("cara"))
    # Every CARA member probes both HSM members (its /health): both see it go, and nothing names the other HSM.
    assert wait_until(lambda: hsm_alerts("firing") == {(m, hsm) for m in cara}, FIRING_WAIT, 1.0) is not None, \
        active(lab)
    alert = next(a for a in active(lab) if a["labels"]["alertname"] == "HapkiHsmMemberDown")
    assert alert["labels"]["severity"] == "warning"
    assert hsm in alert["annotations"]["summary"]
    # `hapki lab status` names it too, with where it is.
    status = subprocess.run([*stack.hapki_command(), "lab", "status", "--dir", str(lab.base_dir)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [line for line in status.splitlines() if "HapkiHsmMemberDown" in line]
    assert len(lines) == len(cara), status
    assert all(line.split()[:2] == ["firing", "warning"] and f"hsm_member={hsm}" in line for line in lines), lines


def test_a_stopped_service_is_pending_at_once(lab: Lab) -> None:
    lab.stop("clm@clm-2")  # the passive CLM member; started again by the fixture

    def pending() -> bool:
        return any(a["labels"]["alertname"] == "HapkiServiceDown" and a["labels"]["job"] == "clm"
                   and a["labels"]["member"] == "clm-2" for a in active(lab))

    assert wait_until(pending, 15.0, 0.5) is not None, active(lab)
