"""The Grafana dashboard: valid JSON in a grafana_dashboard ConfigMap, every PromQL expression parses and names only
metrics that serve/metrics.py exports (read from its source, not a copied list), with labels those metrics carry."""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from .chart import CHART, ROOT, manifests, one, substitute_grafana_variables

METRICS_SOURCE = ROOT / "quantserve" / "serve" / "metrics.py"
METRIC_CLASSES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
RAY_PREFIX = "ray_"
# Labels every series has besides its tag keys: Ray Serve's (added to a replica's metrics), Ray's own, and those the
# PodMonitors add (Prometheus target labels and the relabelings in templates/podmonitors.yaml).
EXTRA_LABELS = {"application", "deployment", "replica",
                "SessionName", "NodeAddress", "Version", "Component", "WorkerId",
                "namespace", "pod", "container", "endpoint", "job", "instance", "ray_io_cluster", "ray_io_group"}
REQUIRED_PANELS = {  # what the dashboard must show -> a title that shows it
    "per-variant request rate": "Request rate per variant",
    "latency quantiles": "Request latency quantiles per variant",
    "images/s": "Images per second per variant",
    "per-backend GEMM throughput": "Quantized GEMM throughput per backend",
    "per-kernel GEMM throughput": "Quantized GEMM throughput per kernel",
    "replica counts": "Replicas per variant",
    "A/B split": "A/B split",
    "shadow difference": "Shadow difference",
    "SSIM against the reference": "Fidelity: SSIM against the reference",
    "rollout weight": "Rollout: candidate weight",
    "rollout decisions": "Rollout decisions",
    "p95 latency ratio": "Rollout: p95 latency ratio, candidate / baseline",
    "replicas, target and running": "Replicas: Serve's target and running",
    "queue wait": "Queue wait per variant",
    "cold start": "Cold start per variant and phase",
}


def _evaluate(node: ast.AST, names: dict[str, Any]) -> Any:
    """Literal tuples, names of module constants and `+` of tuples: what tag_keys are written with."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _evaluate(node.left, names) + _evaluate(node.right, names)
    if isinstance(node, ast.Name):
        return names[node.id]
    return ast.literal_eval(node)


@cache
def exported_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Prometheus name -> (metric type, label names), for every ray.serve.metrics metric serve/metrics.py creates.

    Ray's exporter prefixes `ray_`; a counter is exposed as NAME_total, a histogram as NAME_bucket (with `le`),
    NAME_sum and NAME_count, a gauge as NAME.
    """
    tree = ast.parse(METRICS_SOURCE.read_text())
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                and node.module == "ray.serve.metrics" for alias in node.names}
    assert set(METRIC_CLASSES) <= imported, "serve/metrics.py no longer builds on ray.serve.metrics"
    constants: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = _evaluate(node.value, constants)
            except (ValueError, KeyError, TypeError):
                pass
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in METRIC_CLASSES):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        name = _evaluate(node.args[0] if node.args else kwargs["name"], constants)
        tags = frozenset(_evaluate(kwargs["tag_keys"], constants)) if "tag_keys" in kwargs else frozenset()
        kind = METRIC_CLASSES[node.func.id]
        base = RAY_PREFIX + name
        if kind == "counter":
            found[base + "_total"] = (kind, tags)
        elif kind == "gauge":
            found[base] = (kind, tags)
        else:
            found[base + "_sum"] = found[base + "_count"] = (kind, tags)
            found[base + "_bucket"] = (kind, tags | {"le"})
    return found


# Ray Serve's own metrics the dashboard reads, each with the module of Ray's that defines it (its labels are read
# from that source, like ours)
RAY_SERVE_METRICS = {"serve_autoscaling_target_replicas": "serve/_private/deployment_state.py"}


@cache
def ray_serve_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Prometheus name -> (type, labels) of RAY_SERVE_METRICS, read from the installed Ray's source."""
    import ray

    found: dict[str, tuple[str, frozenset[str]]] = {}
    for name, module in RAY_SERVE_METRICS.items():
        tree = ast.parse((Path(ray.__file__).parent / module).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in METRIC_CLASSES
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == name):
                tags = ast.literal_eval({k.arg: k.value for k in node.keywords}["tag_keys"])
                kind = METRIC_CLASSES[node.func.attr]
                assert kind == "gauge", f"{name}: only Ray's gauges are read here, not a {kind}"
                found[RAY_PREFIX + name] = (kind, frozenset(tags))
        assert RAY_PREFIX + name in found, f"Ray {ray.__version__} no longer defines {name} in {module}"
    return found


def test_ray_serve_metrics_are_read_from_rays_source():
    assert ray_serve_metrics()["ray_serve_autoscaling_target_replicas"] == (
        "gauge", frozenset({"deployment", "application"}))


def test_exported_metrics_are_read_from_serve_metrics_py():
    metrics = exported_metrics()
    assert len(metrics) >= 10
    assert metrics["ray_quantserve_images_total"] == ("counter", frozenset({"variant", "backend", "scheme", "kernel"}))
    assert "le" in metrics["ray_quantserve_request_latency_seconds_bucket"][1]
    assert metrics["ray_quantserve_gemm_gflops"][0] == "gauge"


@cache
def dashboard() -> dict[str, Any]:
    cm = one(manifests(), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    [(key, text)] = cm["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads((CHART / "dashboards" / "quantserve.json").read_text())
    return json.loads(text)


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _expressions() -> list[tuple[str, str, str]]:
    """(where, expression, legend format) of every PromQL expression: panel targets and variable queries."""
    dash = dashboard()
    exprs = [(f"panel {p['title']!r} target {t['refId']}", t["expr"], t.get("legendFormat", ""))
             for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)", query)
            assert match, f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {query}"
            exprs.append((f"variable {var['name']}", match.group(1), "{{" + match.group(2) + "}}"))
    return exprs


def test_dashboard_is_a_grafana_dashboard():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "namespace", "variant"}


def test_dashboard_has_every_required_panel():
    titles = {p["title"] for p in _panels(dashboard())}
    missing = {need: title for need, title in REQUIRED_PANELS.items() if title not in titles}
    assert not missing


EXPRESSIONS = _expressions()


@pytest.mark.parametrize("where,expr,legend", EXPRESSIONS, ids=[where for where, _, _ in EXPRESSIONS])
def test_each_expression_parses_and_names_only_exported_metrics(where: str, expr: str, legend: str):
    metrics = {**exported_metrics(), **ray_serve_metrics()}
    tree = promql_parser.parse(substitute_grafana_variables(expr))
    selectors: list[promql_parser.VectorSelector] = []
    grouping: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        return True

    promql_parser.walk(tree, visit)
    names = [s.name for s in selectors]
    assert names, f"{where}: no metric in {expr}"
    unknown = [n for n in names if n not in metrics]
    assert not unknown, f"{where}: {unknown} are not exported by serve/metrics.py (exported: {sorted(metrics)})"
    labels = set().union(*(metrics[n][1] for n in names)) | EXTRA_LABELS
    for s in selectors:
        own = metrics[s.name][1] | EXTRA_LABELS
        bad = [m.name for m in s.matchers.matchers if m.name not in own]
        assert not bad, f"{where}: {s.name} has no label(s) {bad}"
    assert grouping <= labels, f"{where}: grouping by {sorted(grouping - labels)}, which no series here carries"
    legend_labels = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
    assert legend_labels <= (grouping or labels), f"{where}: legend uses {sorted(legend_labels - (grouping or labels))}"


def test_the_check_fails_on_a_metric_the_app_does_not_export():
    with pytest.raises(AssertionError, match="not exported"):
        test_each_expression_parses_and_names_only_exported_metrics(
            "panel 'x'", 'sum(rate(ray_quantserve_imgs_total{variant=~"$variant"}[$__rate_interval]))', "")
    with pytest.raises(AssertionError, match="grouping by"):
        test_each_expression_parses_and_names_only_exported_metrics(
            "panel 'x'", "sum by (gpu) (ray_quantserve_gemm_gflops)", "")
