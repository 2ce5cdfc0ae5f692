"""`clearip-proxy demo` end to end: every call behaves, the summary says so, exit code 0;
with --keep-running, every SIPp command it prints succeeds as pasted."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearip.relay.labkit.demo.sipp import SIPP_CALLS, scenario_file
from lab.proxy_harness import stop_process, wait_for

ROOT = Path(__file__).resolve().parent.parent


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


class RunningDemo:
    """``demo --keep-running`` as a subprocess; a thread collects its output line by line."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clearip.relay.cli", "demo", "--keep-running"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        wait_for(
            lambda: (
                any("Press Ctrl-C to stop." in line for line in self.lines)
                or self.process.poll() is not None
            ),
            timeout=60,
            what="the demo's keep-running instructions",
        )
        assert self.process.poll() is None, self.output

    def stop(self, signum: int) -> int:
        """Sends ``signum``; returns the exit code once the output is read to its end."""
        self.process.send_signal(signum)
        code = self.process.wait(30)
        self._reader.join(10)
        return code


@contextlib.contextmanager
def running_demo() -> Iterator[RunningDemo]:
    demo = RunningDemo()
    try:
        yield demo
    finally:
        stop_process(demo.process)  # only if a failed test left it running


def _steps(lines: list[str]) -> list[str]:
    """The ladder lines among ``lines``, without the time column, spaces collapsed."""
    steps = []
    for line in lines:
        match = re.match(r"\s+\d+\.\d ms\s+(.*)", line)
        if match:
            steps.append(" ".join(match.group(1).split()))
    return steps


def _in_order(steps: list[str], expected: list[str]) -> bool:
    remaining = iter(steps)
    return all(any(step.startswith(prefix) for step in remaining) for prefix in expected)


# What the proxy's ladder must show for each printed call, in order.
LADDERS = {
    "12125550100": [
        "switch -> proxy INVITE sip:12125550100@",
        "proxy -> ClearIP INVITE",
        "ClearIP -> proxy 302",
        "proxy -> provider A INVITE",
        "provider A -> proxy 200 OK",
        "proxy -> switch 200 OK",
        "switch -> proxy ACK sip:carrier@127.0.0.2",
        "proxy -> provider A ACK",
        "switch -> proxy BYE sip:carrier@127.0.0.2",
        "proxy -> provider A BYE",
        "provider A -> proxy 200 OK",
        "proxy -> switch 200 OK",
    ],
    "911": [
        "switch -> proxy INVITE sip:911@",
        "proxy -> switch 503 Service Unavailable",
        "switch -> proxy ACK sip:911@",
    ],
}


@pytest.mark.sipp
@pytest.mark.slow
def test_keep_running_prints_sipp_commands_that_succeed_as_pasted(tmp_path: Path) -> None:
    with running_demo() as demo:
        demo.wait_ready()
        out = demo.lines
        # The report of the demo's own calls comes first, then the calls to try.
        assert any("7 of 7 calls behaved as expected." in line for line in out), demo.output
        commands = [
            (line.strip(), out[i + 1].strip())
            for i, line in enumerate(out)
            if line.startswith("  sipp ")
        ]
        assert len(commands) == len(LADDERS), demo.output
        for line, shows in commands:
            args = shlex.split(line)
            number = args[args.index("-s") + 1]
            scenario = Path(args[args.index("-sf") + 1])
            assert scenario.is_absolute() and scenario.is_file(), line
            assert args[args.index("-m") + 1] == "1", line
            assert shows.startswith("1 successful call: "), shows
            before = len(demo.lines)
            sipp = subprocess.run(
                args, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            # SIPp exits 0 only if every call (here the one call) went as its scenario says.
            assert sipp.returncode == 0, f"{line}\n{sipp.stdout[-2000:]}\n{sipp.stderr}"
            expected = LADDERS[number]
            wait_for(
                lambda: _in_order(_steps(demo.lines[before:]), expected),  # noqa: B023
                timeout=5,
                what=f"the proxy's ladder for {number}: {expected}",
            )
            if number == "911":
                assert not [s for s in _steps(demo.lines[before:]) if "ClearIP" in s]
        assert demo.stop(signal.SIGINT) == 0, demo.output[-3000:]
        assert demo.lines[-1] == "Stopped.", demo.output[-3000:]


@pytest.mark.slow
def test_keep_running_stops_cleanly_on_sigterm() -> None:
    with running_demo() as demo:
        demo.wait_ready()
        assert demo.stop(signal.SIGTERM) == 0, demo.output[-3000:]
        assert demo.lines[-1] == "Stopped.", demo.output[-3000:]


def test_the_sipp_scenarios_ship_as_package_data() -> None:
    """Each printed call's scenario is found through importlib.resources, as when installed,
    and pyproject.toml ships every scenarios/*.xml with the package."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "scenarios/*.xml" in package_data["clearip.relay.labkit.demo"]
    shipped = sorted(p.name for p in (ROOT / "relay/labkit/demo/scenarios").glob("*.xml"))
    assert shipped == sorted(call.scenario for call in SIPP_CALLS)
    for call in SIPP_CALLS:
        text = scenario_file(call.scenario).read_text()
        assert text.startswith('<?xml version="1.0"'), call.scenario
        ET.fromstring(text.encode("iso-8859-1"))  # well-formed, comment header included
