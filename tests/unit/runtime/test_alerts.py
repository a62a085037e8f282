"""The alerting rules in compose/prometheus/alerts.yml: valid, on exported metrics only, and each one firing on
its fault (with the labels that say where) and on nothing in a healthy busy site, by `promtool test rules`
(tests/unit/runtime/data/alerts_test.yml). tests/lab/test_lab_alerts.py holds them against real faults."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hapki.runtime import metrics
from helpers.promql import metric_names

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "compose" / "prometheus" / "alerts.yml"
CASES = Path(__file__).parent / "data" / "alerts_test.yml"
PROMETHEUS_BUILTINS = {"up"}
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian package prometheus; scripts/setup.sh) not installed")


def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_is_named_once_with_a_severity_and_words_for_the_operator() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) and len(names) >= 10
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_expression_names_exported_metrics() -> None:
    exported = metrics.exported_names() | PROMETHEUS_BUILTINS
    for rule in alerts():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"


def test_every_alert_has_a_firing_case_and_is_held_on_a_healthy_site() -> None:
    tests = yaml.safe_load(CASES.read_text())["tests"]
    healthy = [t for t in tests if t["name"] == "a healthy busy site fires nothing"]
    assert len(healthy) == 1
    silent = {case["alertname"] for case in healthy[0]["alert_rule_test"] if not case.get("exp_alerts")}
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    names = {rule["alert"] for rule in alerts()}
    assert names - silent == set(), "alerts not checked on the healthy site"
    assert names - fired == set(), "alerts without a case that fires them"


@needs_promtool
def test_promtool_accepts_the_rules_and_their_templates() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_each_alert_fires_on_its_fault_and_on_nothing_else(tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # the cases assert which alerts fire with which labels, not their wording
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(CASES, tmp_path / "alerts_test.yml")
    result = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
