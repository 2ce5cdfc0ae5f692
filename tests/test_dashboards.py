"""The Grafana dashboard and the alert rules only name metrics the proxy really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.service.metrics import registry_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "packaging" / "grafana" / "clearip-proxy-dashboard.json"
RULES = ROOT / "packaging" / "prometheus" / "clearip-proxy-alerts.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "tests"
# Metrics the alerts and the dashboard use that /metrics does not export yet (none: every
# declared counter of relay/service/counters.py is exported).
PENDING: set[str] = set()


def exported_names() -> set[str]:
    snapshot = {
        "counters": Counter(),
        "latency": LatencyHistogram(),
        "active_calls": 0,
        "active_transactions": 0,
        "connections": 0,
        "trust_entries": 0,
        "upstreams": {},
        "kernel": None,
    }
    text = generate_latest(registry_for(lambda: snapshot)).decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def _metric_tokens(expr: str) -> set[str]:
    return set(re.findall(r"\bclearip_[a-z_]+", expr))


def test_every_dashboard_query_names_an_exported_metric() -> None:
    names = exported_names()
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "empty dashboard"
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            tokens = _metric_tokens(target["expr"])
            assert tokens, f"{panel['title']}: query names no clearip metric"
            assert tokens - PENDING <= names, f"{panel['title']}: unknown {tokens - names}"


def test_alert_rules_name_exported_metrics_and_explain_themselves() -> None:
    names = exported_names()
    text = RULES.read_text()
    tokens = _metric_tokens(text)
    assert tokens and tokens - PENDING <= names, f"unknown metrics {tokens - names}"
    alerts = re.findall(r"- alert: (\w+)", text)
    assert {
        "ClearIPProxyDown",
        "ClearIPUnreachable",
        "ClearIPFailOpenRate",
        "ClearIPLatencyHigh",
        "ClearIPKernelDropsSurge",
        "ClearIPEmergencyCallsWhileDown",
        "ClearIPOverloadShedding",
        "ClearIPRateLimiting",
        "ClearIPLinkFlapping",
    } <= set(alerts)
    assert text.count("description:") == len(alerts)


def test_the_shedding_alert_metrics_are_exported() -> None:
    names = exported_names()
    assert {"clearip_overload_shed_total", "clearip_rate_limited_total"} <= names
    assert not PENDING


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool not installed: apt-get install prometheus")
    return promtool


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts() -> None:
    """Each alert fires on the traffic it is about and stays quiet below its threshold
    (packaging/prometheus/tests)."""
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files, RULE_TESTS
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files), result.stdout
    fires, quiet = set(), set()
    for case in re.split(r"alertname: ", "".join(f.read_text() for f in files))[1:]:
        name = case.split()[0]
        expected = re.split(r"\n\s*- (?:eval_time|interval):", case)[0]
        (fires if "exp_labels:" in expected else quiet).add(name)
    wanted = {
        "ClearIPOverloadShedding",
        "ClearIPRateLimiting",
        "ClearIPLinkFlapping",
        "ClearIPKernelDropsSurge",
        "ClearIPFailOpenRate",
    }
    assert wanted <= fires, f"never expected to fire: {wanted - fires}"
    assert wanted <= quiet, f"never expected to stay quiet: {wanted - quiet}"
