"""Metrics move as calls do; systemd sees READY=1 and periodic WATCHDOG=1."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lab.proxy_harness import PROVIDER_A_IP, SWITCH_IP, threaded_proxy, write_config
from lab.sipp import clearip_scenario, free_port, sipp_uas, start_sipp, uac_scenario, uas_scenario


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    m = re.search(rf"^{pattern} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} not in metrics"
    return float(m.group(1))


@pytest.mark.sipp
def test_metrics_follow_the_calls(tmp_path: Path) -> None:
    proxy_port, clearip_port = free_port(), free_port("tcp")
    a_port = free_port(host=PROVIDER_A_IP)
    config = write_config(
        tmp_path, port=proxy_port, upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp"
    )
    contact = f"sip:12125550100@{PROVIDER_A_IP}:{a_port}"
    with (
        sipp_uas(
            tmp_path,
            "clearip",
            clearip_scenario(302, [contact]),
            local=("127.0.0.1", clearip_port),
            transport="t1",
            calls=3,
        ),
        sipp_uas(tmp_path, "a", uas_scenario(200), local=(PROVIDER_A_IP, a_port), calls=3),
        threaded_proxy(config) as proxy,
    ):
        port = proxy.call(lambda d: d.metrics.port if d.metrics else 0)
        before = _scrape(port)
        assert (
            _value(
                before,
                "clearip_upstream_up",
                f'upstream="switch",uri="sip:127.0.0.1:{clearip_port};transport=tcp"',
            )
            == 1.0
        )
        switch = start_sipp(
            tmp_path,
            "switch",
            uac_scenario(200),
            local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port),
            service="12125550100",
            calls=3,
            extra=["-r", "10"],
        )
        assert switch.wait(30) == 0
        after = _scrape(port)
    assert (
        _value(after, "clearip_calls_total", 'reason="relayed",role="switch",status="200"') == 3.0
    )
    assert _value(after, "clearip_upstream_responses_total", 'code="302"') == 3.0
    assert _value(after, "clearip_upstream_response_seconds_count") == 3.0
    assert _value(after, "clearip_in_dialog_requests_total", 'method="bye"') == 3.0
    assert "clearip_xdp_packets_total" not in after or "outcome=" not in after


def test_notify_socket_gets_ready_and_watchdog(tmp_path: Path) -> None:
    trust = tmp_path / "trust.toml"
    trust.write_text('[[source]]\ncidr = "127.0.0.1/32"\nrole = "switch"\n')
    config = tmp_path / "proxy.toml"
    port = free_port()
    config.write_text(
        f'[proxy]\ntrust_file = "{trust}"\nworkers = 1\n'  # the supervisor's: test_workers.py
        f'[[listen]]\ntransport = "udp"\naddress = "127.0.0.1"\nport = {port}\n'
        '[upstream.outbound]\nuri = "sip:127.0.0.1:9;transport=tcp"\n'
        "[metrics]\nport = 0\n"
    )
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
        process = subprocess.Popen(
            [sys.executable, "-m", "clearip.relay.cli", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            messages: list[str] = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
                messages.append(sock.recv(4096).decode())
        finally:
            process.terminate()
            process.wait(10)
    assert "READY=1" in messages[0] and "STATUS=" in messages[0]
    assert sum("WATCHDOG=1" in m for m in messages) >= 3


def test_kernel_counters_become_metric_families() -> None:
    from collections import Counter

    from prometheus_client import generate_latest

    from clearip.relay.proxy.latency import LatencyHistogram
    from clearip.relay.service.metrics import registry_for

    snapshot = {
        "counters": Counter(),
        "latency": LatencyHistogram(),
        "active_calls": 0,
        "active_transactions": 0,
        "connections": 0,
        "trust_entries": 2,
        "upstreams": {},
        "kernel": {
            "interfaces": {"eth0": {"mode": "native", "attached": True}},
            "counters": {"dropped_untrusted": 7, "emergency_marked": 1},
        },
    }
    text = generate_latest(registry_for(lambda: snapshot)).decode()
    assert _value(text, "clearip_xdp_attached", 'interface="eth0",mode="native"') == 1.0
    assert _value(text, "clearip_xdp_packets_total", 'outcome="dropped_untrusted"') == 7.0
    assert _value(text, "clearip_xdp_packets_total", 'outcome="emergency_marked"') == 1.0
