"""`clearip-proxy demo` end to end: every call behaves, the summary says so, exit code 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def test_demo_runs_all_calls_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clearip.relay.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert len(summary) == 7
    assert all(call["ok"] for call in summary), summary
    by_name = {call["call"][0]: call for call in summary}
    assert "attest A" in by_name["1"]["observed"]
    assert "provider B" in by_name["2"]["observed"]
    assert by_name["3"]["observed"].startswith("603")
    assert by_name["5"]["clearip_ms"] is None
    assert by_name["6"]["total_ms"] >= 1000
    assert "verstat=TN-Validation-Passed" in by_name["7"]["observed"]


def test_demo_plain_text_report_when_piped() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clearip.relay.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\033[" not in result.stdout
    assert "7 of 7 calls behaved as expected." in result.stdout
    assert "proxy -> ClearIP    INVITE" in result.stdout


@pytest.mark.root
@pytest.mark.xdp
def test_demo_with_the_kernel_filter_on_loopback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clearip.relay.cli", "demo", "--xdp"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    out = result.stdout
    assert "Kernel filter: on (lo generic)" in out
    assert re.search(r"emergency_marked\s+1\n", out), out[-800:]
    assert re.search(r"dropped_untrusted\s+1\n", out)
    assert "dropped from 127.0.0.9: 1" in out
