"""The Grafana dashboards and the alert rules query only what loraforge really exports.

The exported names come from the real exporters, instantiated here: the server's
``ServeMetrics``, the client's ``_Metrics`` and the training gauges, each in a fresh registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import MONITORING
from .promql import family, metric_names, selectors

DASHBOARDS = sorted((MONITORING / "grafana").glob("*.json"))
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
SAMPLE_SUFFIXES = {  # what prometheus_client exposes per family type (created: the _created timestamp)
    "counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"), "info": ("_info",),
}


def exported_series() -> dict[str, set[str]]:
    """Every sample name loraforge exposes -> its label names; plus Prometheus' own ``up``."""
    from prometheus_client import CollectorRegistry

    from loraforge.client.core import _Metrics
    from loraforge.serve.metrics import ServeMetrics
    from loraforge.train.report import training_gauges

    serve, client, train = ServeMetrics(), CollectorRegistry(), CollectorRegistry()
    client_metrics, train_gauges = _Metrics(client), training_gauges(train)
    metrics = [*vars(serve).values(), *vars(client_metrics).values(), *train_gauges.values()]
    labelnames = {m.describe()[0].name: set(m._labelnames) for m in metrics if hasattr(m, "describe")}
    series = {"up": set()}
    for registry in (serve.registry, client, train):
        for fam in registry.collect():
            names = {fam.name + suffix for suffix in SAMPLE_SUFFIXES[fam.type]}
            sampled = {s.name for s in fam.samples}
            assert sampled <= names, f"prometheus_client exposes {sampled - names} for {fam.name}: update SAMPLE_SUFFIXES"
            for name in names:
                series[name] = labelnames[fam.name] | ({"le"} if name.endswith("_bucket") else set())
    return series


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return exported_series()


@pytest.fixture(scope="module")
def jobs() -> set[str]:
    return {c["job_name"] for c in yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]}


def problems(expr: str, exported: dict[str, set[str]], jobs: set[str]) -> list[str]:
    """What is wrong with one PromQL expression: unknown metrics, labels or jobs."""
    found = selectors(expr)
    if not found:
        return [f"reads no metric: {expr!r}"]
    out = []
    for s in found:
        if s.name not in exported:
            known = sorted(n for n in exported if family(n) == family(s.name))
            out.append(f"{s.name} is not exported by loraforge" + (f" (did you mean {', '.join(known)}?)" if known else ""))
            continue
        unknown = s.labels - exported[s.name] - TARGET_LABELS
        if unknown:
            out.append(f"{s.name} has no label {', '.join(sorted(unknown))} (it has {', '.join(sorted(exported[s.name])) or 'none'})")
        if "job" in s.equals and s.equals["job"] not in jobs:
            out.append(f"job {s.equals['job']!r} is not a job of monitoring/prometheus.yml ({', '.join(sorted(jobs))})")
    return out


def panels(path: Path) -> list[dict]:
    out = []
    for panel in json.loads(path.read_text())["panels"]:
        out += [panel, *panel.get("panels", [])]  # collapsed rows hold their panels
    return [p for p in out if p.get("type") != "row"]


def test_both_dashboards_exist():
    assert {p.name for p in DASHBOARDS} == {"training.json", "inference.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(path):
        title = panel.get("title", "").strip()
        assert title, f"{path.name}: panel {panel.get('id')} has no title"
        assert panel["type"] in ("timeseries", "stat"), f"{path.name}/{title}: type {panel['type']}"
        assert panel["targets"], f"{path.name}/{title}: no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip() and target.get("refId"), f"{path.name}/{title}: a target without expr or refId"
            assert target["datasource"]["uid"] == "${datasource}", f"{path.name}/{title}: hard-wired data source"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{path.name}/{title}: wider than the 24-column grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{path.name}: {title!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = title
    ids = [p["id"] for p in panels(path)]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_only_exported_metrics(path, exported, jobs):
    errors = [f"{p['title']}: {e}" for p in panels(path) for t in p["targets"] for e in problems(t["expr"], exported, jobs)]
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_dashboards_show_what_an_operator_needs():
    def read(name):
        return set().union(*(metric_names(t["expr"]) for p in panels(MONITORING / "grafana" / name) for t in p["targets"]))

    assert read("training.json") >= {
        "loraforge_train_loss", "loraforge_train_learning_rate", "loraforge_train_tokens_per_second",
        "loraforge_gpu_memory_allocated_bytes", "loraforge_gpu_utilization_ratio",
    }
    assert read("inference.json") >= {
        "llm_requests_total", "llm_request_duration_seconds_bucket", "llm_time_to_first_token_seconds_bucket",
        "llm_generated_tokens_total", "llm_fallback_total", "llm_circuit_state", "llm_queue_depth", "llm_queue_capacity",
    }


def test_alerts_query_only_exported_metrics(exported, jobs):
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    errors = [f"{r['alert']}: {e}" for g in groups for r in g["rules"] for e in problems(r["expr"], exported, jobs)]
    assert not errors, "\n".join(errors)


# ---- the checker itself: it must be able to fail -------------------------------------------


def test_exported_names_are_the_exposed_ones(exported):
    assert {"llm_requests_total", "llm_fallback_total", "llm_client_requests_total", "llm_queue_capacity",
            "llm_request_duration_seconds_bucket", "llm_request_duration_seconds_count", "loraforge_train_loss", "up"} <= exported.keys()
    assert "llm_requests" not in exported  # a counter is queried with its _total suffix
    assert exported["llm_client_requests_total"] == {"route", "outcome"}
    assert exported["llm_request_duration_seconds_bucket"] == {"model", "endpoint", "status", "le"}


def test_checker_flags_a_made_up_metric_label_and_job(exported, jobs):
    expr = 'sum by (le) (rate(made_up_latency_seconds_bucket{job="loraforge-serve"}[5m])) / on (instance) group_left llm_queue_capacity'
    assert metric_names(expr) == {"made_up_latency_seconds_bucket", "llm_queue_capacity"}
    assert problems(expr, exported, jobs) == ["made_up_latency_seconds_bucket is not exported by loraforge"]
    assert problems("rate(llm_requests[5m])", exported, jobs) == [
        "llm_requests is not exported by loraforge (did you mean llm_requests_created, llm_requests_total?)"]
    assert problems('llm_client_requests_total{status="200"}', exported, jobs) == [
        "llm_client_requests_total has no label status (it has outcome, route)"]
    assert problems('up{job="loraforge"} == 0', exported, jobs) == [
        "job 'loraforge' is not a job of monitoring/prometheus.yml (loraforge-client, loraforge-serve, loraforge-train)"]
    assert problems("vector(1)", exported, jobs) == ["reads no metric: 'vector(1)'"]


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (le) (rate(llm_request_duration_seconds_bucket{le!="", job="x"}[$__rate_interval])))',
     {"llm_request_duration_seconds_bucket"}),
    ("sum(rate(llm_fallback_total[5m])) by (reason) / sum(rate(llm_client_requests_total[5m:30s]))", {"llm_fallback_total", "llm_client_requests_total"}),
    ("a * on (instance) group_left (rank) b offset 5m", {"a", "b"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)") > bool 0', {"up"}),
    ('{__name__="llm_queue_depth", job="x"} > 1e3', {"llm_queue_depth"}),
    ('topk(3, foo{a="}{ not_a_metric"}) or NaN # bar', {"foo"}),
    ("min_over_time(llm_circuit_state[1m]) >= 1 unless count without (route) (x) @ end()", {"llm_circuit_state", "x"}),
    ("sum(rate(llm_generated_tokens_total[${__interval}])) / ignoring(model) sum(rate(llm_prompt_tokens_total[1h30m]))",
     {"llm_generated_tokens_total", "llm_prompt_tokens_total"}),
])
def test_extractor(expr, names):
    assert metric_names(expr) == names
