"""monitoring/: the Prometheus config and the alert rules pass promtool, and every alert is tested."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from .conftest import MONITORING, prometheus_binary


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _series_label(series: str, label: str) -> str | None:
    """'metric{a="x", instance="y"}' -> 'y'."""
    for part in series.split("{", 1)[1].rstrip("}").split(","):
        key, _, value = part.strip().partition("=")
        if key == label:
            return value.strip('"')
    return None


@pytest.mark.parametrize("args", [
    ("check", "config", "prometheus.yml"),
    ("check", "rules", "alerts.yml"),
    ("test", "rules", "alerts_test.yml"),
], ids=lambda a: " ".join(a))
def test_promtool_accepts(args):
    result = subprocess.run([prometheus_binary("promtool"), *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


def test_prometheus_loads_these_rules():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["rule_files"] == ["alerts.yml"]  # the real rules, not a copy


def test_every_alert_says_what_and_what_to_do():
    rules = alert_rules()
    assert len(rules) >= 7
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        annotations, labels = rule.get("annotations", {}), rule.get("labels", {})
        assert annotations.get("summary", "").strip(), f"{rule['alert']}: no summary"
        runbook = annotations.get("runbook", "").strip()
        assert runbook and "\n" not in runbook, f"{rule['alert']}: the runbook must be one line saying what to do"
        assert labels.get("severity") in ("critical", "warning"), f"{rule['alert']}: severity critical or warning"


def test_every_alert_has_a_firing_and_a_quiet_case():
    """In alerts_test.yml each alert fires for some series and stays quiet for others."""
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    fired: dict[str, set[str]] = {}
    quiet: dict[str, set[str]] = {}
    for case in tests:
        instances = {_series_label(s["series"], "instance") for s in case["input_series"]}
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            firing = {a["exp_labels"]["instance"] for a in check["exp_alerts"]}
            fired.setdefault(name, set()).update(firing)
            quiet.setdefault(name, set()).update(instances - firing)
    for rule in alert_rules():
        name = rule["alert"]
        assert fired.get(name), f"{name}: no test case where it fires"
        assert quiet.get(name, set()) - fired[name], f"{name}: no series that must leave it quiet"
