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

from clearip.relay.metrics import LatencyHistogram, registry_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "packaging" / "grafana" / "clearip-proxy-dashboard.json"
RULES = ROOT / "packaging" / "prometheus" / "clearip-proxy-alerts.yml"


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
            assert tokens <= names, f"{panel['title']}: unknown {tokens - names}"


def test_alert_rules_name_exported_metrics_and_explain_themselves() -> None:
    names = exported_names()
    text = RULES.read_text()
    tokens = _metric_tokens(text)
    assert tokens and tokens <= names, f"unknown metrics {tokens - names}"
    alerts = re.findall(r"- alert: (\w+)", text)
    assert {
        "ClearIPProxyDown",
        "ClearIPUnreachable",
        "ClearIPFailOpenRate",
        "ClearIPLatencyHigh",
        "ClearIPKernelDropsSurge",
        "ClearIPEmergencyCallsWhileDown",
    } <= set(alerts)
    assert text.count("description:") == len(alerts)


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool not installed: apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
