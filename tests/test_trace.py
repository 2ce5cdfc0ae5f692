"""clearipctl trace: the plaintext of every leg, the TLS leg to ClearIP included, as a pcap
that tshark opens."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.proxy_harness import PROVIDER_A_IP, SWITCH_IP, threaded_proxy
from lab.sipp import free_port, sipp_uas, start_sipp, uac_scenario, uas_scenario
from tests.test_proxy_tls import _config, _emulator, _rules

pytestmark = [pytest.mark.sipp, pytest.mark.slow]


def _tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        import os

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but tshark is missing (apt-get install tshark)")
        pytest.skip("tshark not installed: apt-get install tshark")
    return path


def test_trace_pcap_of_a_tls_call_opens_in_tshark(tmp_path: Path) -> None:
    tshark = _tshark()
    from clearip.relay.labkit.labca import make_lab_certificates

    certs = make_lab_certificates(tmp_path / "lab")
    a_port = free_port(host=PROVIDER_A_IP)
    pcap = tmp_path / "call.pcap"
    for tls_port in _emulator(tmp_path, _rules(a_port), tmp_path / "lab"):
        proxy_port = free_port()
        config = _config(tmp_path, proxy_port, tls_port, certs.ca_file)
        with (
            sipp_uas(tmp_path, "a", uas_scenario(200), local=(PROVIDER_A_IP, a_port)),
            threaded_proxy(config),
        ):
            tracer = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "clearip.ctl.cli",
                    "--socket",
                    str(tmp_path / "control.sock"),
                    "trace",
                    "--pcap",
                    str(pcap),
                    "--seconds",
                    "8",
                ],
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)
            switch = start_sipp(
                tmp_path,
                "switch",
                uac_scenario(200),
                local=(SWITCH_IP, free_port()),
                remote=("127.0.0.1", proxy_port),
                service="12125550100",
            )
            assert switch.wait(30) == 0
            _, err = tracer.communicate(timeout=30)
            assert tracer.returncode == 0, err
    result = subprocess.run(
        [tshark, "-r", str(pcap), "-d", f"udp.port=={tls_port},sip", "-Y", "sip",
         "-T", "fields", "-e", "ip.dst", "-e", "udp.dstport", "-e", "sip.Method",
         "-e", "sip.Status-Code"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    to_clearip = [r for r in rows if r[1] == str(tls_port) and r[2] == "INVITE"]
    from_clearip = [r for r in rows if r[3] == "302"]
    assert to_clearip, result.stdout
    assert from_clearip, result.stdout
    assert any(r[2] == "BYE" for r in rows)
