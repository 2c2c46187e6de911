"""The Grafana dashboard (deploy/grafana/zimage-dashboard.json): every PromQL query parses (promql-parser, a real
PromQL parser), names only metrics that the service exports (read from orchestrator/metrics.py's registry, with the
_bucket/_sum/_count and _total series Prometheus scrapes), uses only their labels, and the panels cover what an
operator needs."""

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "zimage-dashboard.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every series it scrapes
FRONTDOOR_LABEL = "frontdoor"  # added by each front door to every series it exports (frontdoor_metrics.py)
# Grafana's variables, replaced by values of the right kind before parsing.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${instance}": ".*", "$instance": ".*",
             "${frontdoor}": ".*", "$frontdoor": ".*"}


def _promql():
    try:
        import promql_parser
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("promql-parser is not installed; it comes with `pip install -e .[test]`")
        pytest.skip("promql-parser is not installed (pip install -e .[test])")
    return promql_parser


def exported_series() -> dict[str, set[str]]:
    """Every series name the service's /metrics can show -> its label names (without Prometheus' own)."""
    from prometheus_client import Counter, Gauge, Histogram

    from orchestrator.metrics import PrometheusObserver

    obs = PrometheusObserver()
    out: dict[str, set[str]] = {}
    metrics = [m for m in vars(obs).values() if isinstance(m, (Counter, Gauge, Histogram))]
    assert {f.name for f in obs.registry.collect()} == {m._name.removesuffix("_total") for m in metrics}
    for m in metrics:
        labels = set(m._labelnames) | {FRONTDOOR_LABEL}
        if isinstance(m, Counter):
            base = m._name.removesuffix("_total")
            out[base + "_total"] = labels
            out[base + "_created"] = labels
        elif isinstance(m, Histogram):
            out[m._name + "_bucket"] = labels | {"le"}
            for suffix in ("_sum", "_count", "_created"):
                out[m._name + suffix] = labels
        else:
            out[m._name] = labels
    return out


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for p in _panels(dashboard["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            assert m, f"variable {v['name']}: {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def check(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Problems with one query: parse errors, unknown metrics, unknown labels."""
    pp = _promql()
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        return [f"unreplaced Grafana variable in {expr!r}"]
    try:
        ast = pp.parse(expr)
    except Exception as e:  # noqa: BLE001 - the parser's own error types
        return [f"does not parse: {e}"]
    problems, names, grouping = [], [], []

    def visit(node):
        if isinstance(node, pp.VectorSelector):
            if node.name is None:
                problems.append(f"selector without a metric name: {node}")
                return
            names.append(node.name)
            known = series.get(node.name)
            if known is None:
                problems.append(f"unknown metric {node.name}")
            else:
                for m in node.matchers.matchers:
                    if m.name not in known | SCRAPE_LABELS:
                        problems.append(f"{node.name} has no label {m.name!r}")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            grouping.extend(node.modifier.labels)

    pp.walk(ast, pre_visit=visit)
    available = set().union(*(series.get(n, set()) for n in names)) | SCRAPE_LABELS
    problems += [f"grouping by {lb!r}, a label of none of {names}" for lb in grouping if lb not in available]
    if not names:
        problems.append("names no metric")
    return problems


def test_every_query_parses_and_names_exported_metrics():
    series = exported_series()
    dash = json.loads(DASHBOARD.read_text())
    found = queries(dash)
    assert len(found) >= 20
    problems = [f"{where}: {p}" for where, expr in found for p in check(expr, series)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_mistakes():
    series = exported_series()
    assert check('sum(rate(zimage_requests_totl{instance=~"$instance"}[$__rate_interval]))', series) == [
        "unknown metric zimage_requests_totl"]
    assert check("zimage_request_latency_seconds", series) == ["unknown metric zimage_request_latency_seconds"]
    assert check('sum by (typ) (rate(zimage_request_errors_total[5m]))', series) == [
        "grouping by 'typ', a label of none of ['zimage_request_errors_total']"]
    assert check('zimage_replica_up{replcia="r0"}', series) == ["zimage_replica_up has no label 'replcia'"]
    assert check("sum(rate(zimage_images_generated_total[5m])", series)[0].startswith("does not parse")
    assert check("sum(rate(zimage_images_generated_total[$__rate_interval]))", series) == []


def test_the_panels_cover_what_an_operator_needs():
    dash = json.loads(DASHBOARD.read_text())
    used = " ".join(expr for _, expr in queries(dash))
    for needed in (
        "zimage_images_generated_total",  # throughput
        "histogram_quantile(0.95, sum by (le) (rate(zimage_request_latency_seconds_bucket",  # latency percentiles
        "histogram_quantile(0.99, sum by (le) (rate(zimage_request_latency_seconds_bucket",
        "zimage_queue_time_seconds_bucket", "zimage_requests_waiting", "zimage_requests_running",  # queue
        "zimage_batch_size_bucket", "zimage_batch_size_sum",  # batch sizes
        "zimage_replica_up", "zimage_replica_busy", "zimage_replica_events_total",  # replicas
        "zimage_gpu_memory_bytes", "zimage_gpu_memory_peak_bytes",  # GPU memory
        "sum by (type) (rate(zimage_request_errors_total",  # errors by type
        "zimage_stage_seconds_bucket", "zimage_requests_total",
        "zimage_eager_fallbacks_total",
        'zimage_compilations_total{instance=~"$instance",frontdoor=~"$frontdoor",phase="serving"}',  # misses
    ):
        assert needed in used, needed


def test_dashboard_is_importable():
    """What Grafana needs to import it: a uid, unique panel ids, positions, the data source variable on every
    panel and target, and refIds."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "frontdoor"} <= names
    for p in _panels(dash["panels"]):
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["datasource"] == p["datasource"] for t in p["targets"])
        exprs = " ".join(t["expr"] for t in p["targets"])
        assert 'instance=~"$instance",frontdoor=~"$frontdoor"' in exprs, p["title"]


def test_every_exported_sample_names_its_front_door_and_the_dashboard_tells_them_apart():
    """Several front doors over one pool: each labels its series, and the dashboard both sums them and shows each
    (images/s, queue, latency, errors per front door; the replicas' own queue length; Idempotency-Key outcomes)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.frontdoor_metrics import labelled_registry
    from orchestrator.metrics import PrometheusObserver

    obs = PrometheusObserver()
    obs.http_response(200)
    obs.replica_queue.labels("r0").set(3)
    obs.idempotent_call("replayed")
    text = generate_latest(labelled_registry(obs.registry, "fd-a")).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert samples and all(s.labels.get(FRONTDOOR_LABEL) == "fd-a" for s in samples)
    assert {"zimage_replica_queue_length", "zimage_idempotency_requests_total"} <= {s.name for s in samples}
    used = " ".join(expr for _, expr in queries(json.loads(DASHBOARD.read_text())))
    for needed in ("sum by (frontdoor) (rate(zimage_images_generated_total",
                   "histogram_quantile(0.95, sum by (le, frontdoor)", "zimage_replica_queue_length",
                   "sum by (outcome) (rate(zimage_idempotency_requests_total",
                   "sum(max by (replica) (zimage_replica_up"):
        assert needed in used, needed
