"""The proxy with the ClearIP emulator over TLS: real SIPp switch and carriers, real certs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearip.relay.labkit.labca import make_lab_certificates
from lab.proxy_harness import PROVIDER_A_IP, SWITCH_IP, threaded_proxy, write_config
from lab.sipp import (
    free_port,
    sipp_uas,
    start_sipp,
    uac_answered_then_bye_received,
    uac_scenario,
    uas_hangup_scenario,
)

pytestmark = [pytest.mark.sipp, pytest.mark.slow]


def _emulator(directory: Path, rules: str, certs_dir: Path) -> Iterator[int]:
    (directory / "rules.toml").write_text(rules)
    ready = directory / "emulator-ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clearip.relay.labkit.emulator",
            "--rules",
            str(directory / "rules.toml"),
            "--tls",
            "127.0.0.1:0",
            "--certificate",
            str(certs_dir / "server.pem"),
            "--private-key",
            str(certs_dir / "server.key"),
            "--ready-file",
            str(ready),
            "--stats-file",
            str(directory / "emulator-stats.json"),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "emulator did not start"
        time.sleep(0.05)
    try:
        yield int(json.loads(ready.read_text())["tls"][0])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def _rules(a_port: int) -> str:
    return f"""
[[rule]]
name = "route"
dialled = "12125550100"
action = "route"
attest = "A"
contacts = ["sip:{{dialled}}@{PROVIDER_A_IP}:{a_port}"]

[[rule]]
name = "block"
dialled = "12125550199"
action = "block"
reason = "Robocall"
"""


@pytest.fixture
def tls_lab(tmp_path: Path) -> Iterator[tuple[Path, int, int, Path]]:
    certs = make_lab_certificates(tmp_path / "lab")
    a_port = free_port(host=PROVIDER_A_IP)
    for port in _emulator(tmp_path, _rules(a_port), tmp_path / "lab"):
        yield tmp_path, port, a_port, certs.ca_file


def _config(
    directory: Path, proxy_port: int, tls_port: int, ca_file: Path, name: str = "localhost"
) -> Path:
    extra = "[upstream.outbound.tls]\n" if False else ""
    path = write_config(
        directory,
        port=proxy_port,
        upstream=f"sip:{name}:{tls_port};transport=tls",
        ca_file=str(ca_file),
        extra=extra,
    )
    return path


def test_call_over_tls_upstream_with_identity_and_callee_bye(
    tls_lab: tuple[Path, int, int, Path],
) -> None:
    directory, tls_port, a_port, ca_file = tls_lab
    proxy_port = free_port()
    config = _config(directory, proxy_port, tls_port, ca_file)
    with (
        sipp_uas(directory, "a", uas_hangup_scenario(), local=(PROVIDER_A_IP, a_port)) as a,
        threaded_proxy(config) as proxy,
    ):
        assert proxy.call(lambda d: d.status()["upstreams"]["switch"]["state"]) == "up"
        switch = start_sipp(
            directory,
            "switch",
            uac_answered_then_bye_received(),
            local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port),
            service="12125550100",
        )
        assert switch.wait(30) == 0, switch.messages[-3000:]
        assert a.wait(10) == 0, a.messages[-3000:]
        invite = a.received("INVITE ")[0]
        assert "Identity: eyJ" in invite and "ppt=shaken" in invite
        assert switch.received("BYE "), "the callee's BYE did not reach the switch"


def test_block_over_tls(tls_lab: tuple[Path, int, int, Path]) -> None:
    directory, tls_port, _, ca_file = tls_lab
    proxy_port = free_port()
    with threaded_proxy(_config(directory, proxy_port, tls_port, ca_file)):
        switch = start_sipp(
            directory,
            "switch",
            uac_scenario(603),
            local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port),
            service="12125550199",
        )
        assert switch.wait(30) == 0, switch.messages[-3000:]
        assert 'text="Robocall"' in switch.received("SIP/2.0 603")[0]


def test_wrong_certificate_name_is_refused_and_calls_fail_open(
    tls_lab: tuple[Path, int, int, Path],
) -> None:
    """A certificate that does not match the name: no plaintext fall-back, fail open."""
    directory, tls_port, _, ca_file = tls_lab
    proxy_port = free_port()
    config = _config(directory, proxy_port, tls_port, ca_file)
    text = config.read_text().replace(
        f'uri = "sip:localhost:{tls_port};transport=tls"',
        f'uri = "sip:127.0.0.1:{tls_port};transport=tls"\nserver_name = "clearip.wrong.example"',
    )
    config.write_text(text)
    with threaded_proxy(config) as proxy:
        status = proxy.call(lambda d: d.status()["upstreams"]["switch"])
        assert status["state"] != "up"
        assert (
            "certificate" in status["last_error"].lower()
            or "verify" in status["last_error"].lower()
        )
        switch = start_sipp(
            directory,
            "switch",
            uac_scenario(503),
            local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port),
            service="12125550100",
        )
        assert switch.wait(30) == 0, switch.messages[-3000:]
    stats_file = directory / "emulator-stats.json"
    assert not stats_file.exists() or json.loads(stats_file.read_text()).get("invites", 0) == 0
