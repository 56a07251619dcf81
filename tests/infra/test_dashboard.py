"""The Grafana dashboard (infra/dashboards/sluice.json) asks only for metrics Sluice exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from gateway import metrics as gateway_metrics
from infra.scaler.metrics import ScalerMetrics
from worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "dashboards" / "sluice.json"
# A metric name in PromQL: `sluice:` then name characters, not followed by more of them.
METRIC = re.compile(r"sluice:[A-Za-z0-9_:]+")
# The series each metric type exposes, by the suffixes the Prometheus client adds.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Series name -> the label names it carries ("le" on buckets)."""
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        # An unlabelled collect shows no samples of labelled metrics; the labels are on the
        # metric objects, which the registry keeps by name.
        labels = set(registry._names_to_collectors[  # type: ignore[attr-defined]
            family.name + SUFFIXES[family.type][0]]._labelnames)
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def project_series() -> dict[str, set[str]]:
    series: dict[str, set[str]] = {}
    for registry in (gateway_metrics.REGISTRY, WorkerMetrics("m").registry,
                     ScalerMetrics("m").registry):
        for name, labels in exported(registry).items():
            series.setdefault(name, set()).update(labels)
    return series


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL string: panel targets and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            # "query" is also Grafana's name for non-PromQL settings; only PromQL names metrics.
            is_promql = key in ("expr", "definition") or (key == "query" and "sluice:" in value)
            if isinstance(value, str) and is_promql:
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def test_dashboard_uses_only_metrics_the_project_exports() -> None:
    series = project_series()
    exprs = list(expressions(json.loads(DASHBOARD.read_text())))
    assert len(exprs) >= 15
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used, "no sluice: metric in the dashboard"
    assert used <= set(series), f"not exported by any Sluice process: {sorted(used - set(series))}"


def test_grouping_labels_exist_on_the_metrics() -> None:
    series = project_series()
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        for by in re.findall(r"by \(([^)]*)\)", expr):
            labels = {label.strip() for label in by.split(",")}
            metrics = METRIC.findall(expr)
            assert any(labels <= series[m] for m in metrics), f"{labels} not on {metrics}: {expr}"


def test_dashboard_covers_each_process() -> None:
    used = {m for e in expressions(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(e)}
    for needed in ("sluice:scaler_desired_workers", "sluice:scaler_current_workers",
                   "sluice:scaler_ready_workers", "sluice:kv_cache_usage_perc",
                   "sluice:num_requests_waiting", "sluice:time_to_first_token_seconds_bucket"):
        assert needed in used


def test_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        x, width = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert x >= 0 and x + width <= 24
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            # Every $variable is defined (Grafana's own $__ variables aside).
            assert set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__interval",
                                                        "__range"} <= variables, expr
