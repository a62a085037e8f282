"""The Grafana dashboards in compose/grafana/dashboards: valid, and every PromQL names metrics the services export.

The exported names come from the real Prometheus exporter run over the catalog (hapki.runtime.metrics); the
integration test tests/integration/test_metrics.py checks that a real process exports only catalog names.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hapki.runtime import metrics
from helpers.promql import metric_names

DASHBOARDS = Path(__file__).resolve().parents[3] / "compose" / "grafana" / "dashboards"
_GRAFANA_VARIABLES = {"$__range": "5m", "$__rate_interval": "1m", "$__interval": "15s"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and annotation queries."""
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    found += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return found


def test_the_three_dashboards_exist_with_unique_uids() -> None:
    found = dashboards()
    assert set(found) == {"issuance.json", "ha.json", "hsm-db.json"}
    uids = [d["uid"] for d in found.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in found.items():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(set(ids)) == len(ids), name
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])


def test_the_parser_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, pki_profile) (rate(hapki_x_bucket{a="b",c=~"d|e"}[1m]))) '
            '/ on (job) group_left sum without (x) (hapki_y) > bool 0 and hapki_z offset 5m')
    assert metric_names(expr) == {"hapki_x_bucket", "hapki_y", "hapki_z"}


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_expression_names_exported_metrics(name: str) -> None:
    exported = metrics.exported_names()
    exprs = expressions(dashboards()[name])
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{name}: {sorted(names - exported)} not exported (in {expr!r})"


def test_every_catalog_metric_is_on_a_dashboard() -> None:
    used = {n for d in dashboards().values() for e in expressions(d) for n in metric_names(e)}
    # Strip the exporter's suffixes back to one name per catalog instrument.
    stems = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = [spec.name for spec in metrics.CATALOG.values()
               if not any(stem.startswith(spec.name.replace(".", "_")) for stem in stems)]
    assert not missing, f"catalog metrics on no dashboard: {missing}"


def test_the_ha_dashboard_marks_failovers() -> None:
    annotations = [a for a in dashboards()["ha.json"]["annotations"]["list"] if "expr" in a]
    assert any("hapki_ha_role_changes_total" in a["expr"] for a in annotations)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    rules = []
    for name, dashboard in dashboards().items():
        for number, expr in enumerate(expressions(dashboard)):
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"check:{name.removesuffix('.json').replace('-', '_')}:{number}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
