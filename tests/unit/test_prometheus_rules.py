"""deploy/prometheus/edgewise-rules.yml: well formed, and every metric (and label value) its
expressions select is one the control plane exports (promtool is not installed here: the file
is read with PyYAML and the names are checked against a scrape of the real collectors)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from edgewise.cloud.fleet_metrics import FleetGauges, FleetSummary
from edgewise.cloud.metrics import Metrics

RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "edgewise-rules.yml"
METRIC = re.compile(r"\b(edgewise_[a-z0-9_]+)(\{[^}]*\})?")
LABEL = re.compile(r'([a-z_]+)\s*=\s*"([^"]*)"')
FUNCTIONS = {"time", "sum", "without", "ignoring", "max", "min", "by", "on", "rate"}


def exported() -> dict[str, set[tuple[str, str]]]:
    """Metric name -> the (label, value) pairs of its samples, from one scrape."""
    metrics = Metrics()
    gauges = FleetGauges(None)  # type: ignore[arg-type]  # no store: the summary is given
    gauges.summary = FleetSummary(outbox_oldest={9: 12.0, 5: 3.0},
                                  outbox_waiting={9: 4, 5: 10}, updated=1.0)
    metrics.registry.register(gauges)
    out: dict[str, set[tuple[str, str]]] = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("#") or not line:
            continue
        m = METRIC.match(line)
        assert m is not None, line
        out.setdefault(m.group(1), set()).update(LABEL.findall(m.group(2) or ""))
    return out


def test_rules_are_well_formed_and_name_exported_metrics() -> None:
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    assert group["name"] == "edgewise-fleet"
    names = exported()
    alerts = []
    for rule in group["rules"]:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Edgewise[A-Za-z]+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"].strip()
        expr = " ".join(rule["expr"].split())
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
        used = METRIC.findall(expr)
        assert used, (rule["alert"], "selects no edgewise metric")
        for name, selector in used:
            assert name in names, (rule["alert"], name, sorted(names))
            for label, value in LABEL.findall(selector):
                assert (label, value) in names[name], (rule["alert"], name, label, value)
        words = set(re.findall(r"\b([a-z_]+)\s*\(", expr)) - {n for n, _ in used}
        assert words <= FUNCTIONS, (rule["alert"], words)
        alerts.append(rule["alert"])
    assert alerts == ["EdgewiseNodesOffline", "EdgewiseManyNodesOffline",
                      "EdgewiseNodesDegraded", "EdgewiseOutboxOld", "EdgewiseAlarmsWaiting",
                      "EdgewiseUpdatesFailed", "EdgewiseCertificatesExpiring",
                      "EdgewiseRolloutPaused", "EdgewiseFleetGaugesStale"]


def test_a_misspelt_metric_would_be_caught() -> None:
    names = exported()
    assert "edgewise_fleet_nodes" in names
    assert ("state", "paused") in names["edgewise_rollouts"]
    assert "edgewise_fleet_node" not in names
    assert ("priority", "9") in names["edgewise_fleet_outbox_oldest_seconds"]
