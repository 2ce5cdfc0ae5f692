"""Reload without a restart: SIGHUP, ``clearip-proxy reload`` and ``clearipctl reload`` re-read
the config file and the trust list; calls in flight keep the settings they started with; a bad
file changes nothing. The daemon runs as its own process (``clearip-proxy run``), the switch
and the ClearIP stand-in are SIPp."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from clearip.ctl.client import Client
from clearip.relay.policy.trust import Role
from lab.proxy_harness import SWITCH_IP, UNTRUSTED_IP, proxy_process, wait_for, write_config
from lab.sipp import Sipp, clearip_scenario, free_port, sipp_uas, start_sipp, uac_scenario
from lab.sipp import uas_scenario as uas

DIALLED = "12125550100"


def _options(port: int) -> bytes:
    return (
        f"OPTIONS sip:proxy@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {UNTRUSTED_IP}:{port};branch=z9hG4bK{time.monotonic_ns()}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:p@127.0.0.1>\r\n"
        f"Call-ID: r{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _answered(proxy_port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((UNTRUSTED_IP, 0))
        sock.settimeout(0.5)
        sock.sendto(_options(sock.getsockname()[1]), ("127.0.0.1", proxy_port))
        try:
            return sock.recv(4000).startswith(b"SIP/2.0 ")
        except TimeoutError:
            return False


def test_sighup_reloads_the_trust_list(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path, port=port, upstream="sip:127.0.0.1:9;transport=tcp",
        trust=[("127.0.0.1/32", Role.SWITCH)],
    )  # fmt: skip
    trust = tmp_path / "trust.toml"
    with proxy_process(config, tmp_path / "proxy.log") as process:
        assert not _answered(port)
        trust.write_text(
            trust.read_text() + f'\n[[source]]\ncidr = "{UNTRUSTED_IP}/32"\nrole = "switch"\n'
        )
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _answered(port)
        trust.write_text("[[source]\nbroken")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _answered(port), "a broken trust file must not replace the working list"
    assert "reload refused" in (tmp_path / "proxy.log").read_text()


# -- the config file -------------------------------------------------------------------------
@dataclass
class Lab:
    dir: Path
    proxy_port: int
    clearip_port: int
    config: Path

    @classmethod
    def make(cls, directory: Path, *, upstream_timeout: float, extra: str = "") -> Lab:
        proxy_port, clearip_port = free_port(), free_port("tcp")
        config = write_config(
            directory,
            port=proxy_port,
            upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp",
            extra=extra,
        )
        lab = cls(directory, proxy_port, clearip_port, config)
        lab.edit("upstream_timeout = 1.5", f"upstream_timeout = {upstream_timeout}")
        return lab

    @property
    def log(self) -> Path:
        return self.dir / "proxy.log"

    @property
    def control(self) -> str:
        return str(self.dir / "control.sock")

    def edit(self, old: str, new: str) -> None:
        text = self.config.read_text()
        assert old in text, old
        self.config.write_text(text.replace(old, new))

    def clearip(self, scenario: str, calls: int) -> Iterator[Sipp]:
        return sipp_uas(
            self.dir,
            "clearip",
            scenario,
            local=("127.0.0.1", self.clearip_port),
            transport="t1",
            calls=calls,
        )

    def switch(self, name: str, scenario: str, service: str = DIALLED) -> Sipp:
        return start_sipp(
            self.dir,
            name,
            scenario,
            local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", self.proxy_port),
            service=service,
        )

    def reload(self, tool: str = "clearip-proxy") -> subprocess.CompletedProcess[str]:
        if tool == "clearip-proxy":
            args = ["clearip.relay.cli", "reload", "--config", str(self.config)]
        else:
            args = ["clearip.ctl.cli", "--socket", self.control, "reload"]
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, timeout=30
        )

    def idle(self, timeout: float = 15.0) -> tuple[int, int]:
        """(calls, transactions) in the running daemon, once both are 0 (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            status = Client(self.control).call("status")["result"]
            state = (status["active_calls"], status["active_transactions"])
            if state == (0, 0) or time.monotonic() > deadline:
                return state
            time.sleep(0.1)

    def logged(self, needle: str) -> bool:
        return needle in self.log.read_text()


_STAMP = re.compile(r"^-+ (\d{4}-\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+)", re.MULTILINE)


def _setup_time(switch: Sipp, final: str) -> float:
    """Seconds from the switch sending its INVITE to receiving ``final``, by SIPp's own log."""
    sent = received = None
    parts = _STAMP.split(switch.messages)  # [before, stamp, message, stamp, message, ...]
    for stamp, block in zip(parts[1::2], parts[2::2], strict=True):
        when = datetime.strptime(" ".join(stamp.split()), "%Y-%m-%d %H:%M:%S.%f")
        body = block.split("\n\n", 1)[-1].lstrip()
        if sent is None and "message sent" in block and body.startswith("INVITE "):
            sent = when
        if "message received" in block and body.startswith(f"SIP/2.0 {final}"):
            received = when
    assert sent is not None and received is not None, switch.messages[-2000:]
    return (received - sent).total_seconds()


def _final(switch: Sipp, code: int) -> str:
    assert switch.wait(20) == 0, f"switch scenario failed:\n{switch.messages[-3000:]}"
    return switch.received(f"SIP/2.0 {code}")[0]


@pytest.mark.sipp
@pytest.mark.slow
def test_a_call_in_flight_keeps_the_timeout_it_started_with(tmp_path: Path) -> None:
    lab = Lab.make(tmp_path, upstream_timeout=3.0)
    with lab.clearip(uas(0), calls=2) as clearip, proxy_process(lab.config, lab.log):
        first = lab.switch("first", uac_scenario(503))
        wait_for(lambda: clearip.received("INVITE "), 5, "the first INVITE at ClearIP")
        lab.edit("upstream_timeout = 3.0", "upstream_timeout = 1.0")
        reloaded = lab.reload()
        assert reloaded.returncode == 0, reloaded.stderr
        assert reloaded.stdout.splitlines() == ["applied  proxy.upstream_timeout: 3.0 -> 1.0"]
        second = lab.switch("second", uac_scenario(503))
        for switch in (first, second):
            assert "ClearIP did not answer in time (fail-open)" in _final(switch, 503)
        # The call that was waiting keeps 3 s; the one after the reload gets 1 s.
        assert _setup_time(first, "503") >= 2.5
        assert 0.8 <= _setup_time(second, "503") <= 2.0
        assert len(clearip.received("INVITE ")) == 2
        assert lab.idle() == (0, 0)
    assert lab.logged("reload: proxy.upstream_timeout: 3.0 -> 1.0")


@pytest.mark.sipp
@pytest.mark.slow
def test_a_bad_file_keeps_every_running_setting(tmp_path: Path) -> None:
    lab = Lab.make(tmp_path, upstream_timeout=2.0)
    good = lab.config.read_text()
    # Valid changes (a shorter timeout, 112 as an emergency number) next to each error: none
    # of them may apply.
    changes = good.replace("upstream_timeout = 2.0", "upstream_timeout = 0.5")
    changes += '\n[emergency]\nnumbers = ["911", "112"]\n'
    unknown_key = changes.replace("provider_timeout = 1.0", "provider_timeout = 1.0\nupstrem = 1")
    bad_value = changes.replace('level = "debug"', 'level = "loud"')
    with lab.clearip(uas(0), calls=1) as clearip, proxy_process(lab.config, lab.log) as process:
        lab.config.write_text(unknown_key)
        refused = lab.reload()
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert "unknown key(s) upstrem in [proxy]" in refused.stderr
        assert refused.stdout == ""
        by_ctl = lab.reload("clearipctl")
        assert by_ctl.returncode == 2 and "upstrem" in by_ctl.stderr
        lab.config.write_text(bad_value)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: lab.logged("log.level = 'loud' is invalid"), 5, "the SIGHUP refusal")
        # The next call, to 112: not an emergency, so it goes to ClearIP, which is silent, and
        # gets its fail-open after the old 2 s.
        switch = lab.switch("switch", uac_scenario(503), service="112")
        assert "ClearIP did not answer in time (fail-open)" in _final(switch, 503)
        assert _setup_time(switch, "503") >= 1.5
        assert clearip.received("INVITE sip:112@")
        assert lab.idle() == (0, 0)
    errors = [line for line in lab.log.read_text().splitlines() if " ERROR " in line]
    assert any("reload refused" in e and "upstrem" in e for e in errors), errors
    assert any("reload refused" in e and "log.level = 'loud'" in e for e in errors), errors
    assert not lab.logged("reload: ")  # nothing applied, not even partly


@pytest.mark.sipp
@pytest.mark.slow
def test_reload_prints_the_applied_keys_and_those_needing_a_restart(tmp_path: Path) -> None:
    lab = Lab.make(tmp_path, upstream_timeout=1.5)
    good = lab.config.read_text()
    new_port, metrics_port = free_port("tcp"), free_port("tcp")
    trust = tmp_path / "trust.toml"
    with proxy_process(lab.config, lab.log):
        lab.edit("upstream_timeout = 1.5", "upstream_timeout = 4.0\nroute_advance_codes = [503]")
        lab.edit('level = "debug"', 'level = "info"')
        lab.edit("[metrics]\nport = 0", f"[metrics]\nport = {metrics_port}")
        lab.edit(
            "[upstream.outbound]",
            f'[[listen]]\ntransport = "tcp"\naddress = "127.0.0.1"\nport = {new_port}\n\n'
            "[upstream.outbound]",
        )
        trust.write_text(
            trust.read_text() + f'\n[[source]]\ncidr = "{UNTRUSTED_IP}/32"\nrole = "switch"\n'
        )
        listen = f"udp:127.0.0.1:{lab.proxy_port}, tcp:127.0.0.1:{lab.proxy_port}"
        restart = [
            f"restart  listen: [{listen}] -> [{listen}, tcp:127.0.0.1:{new_port}] "
            "(not applied: needs a restart)",
            f"restart  metrics.port: 0 -> {metrics_port} (not applied: needs a restart)",
        ]
        result = lab.reload("clearipctl")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "applied  proxy.upstream_timeout: 1.5 -> 4.0",
            "applied  proxy.route_advance_codes: [408, 500, 502, 503, 504] -> [503]",
            'applied  log.level: "debug" -> "info"',
            "applied  trust list: 3 entries -> 4 entries",
            *restart,
        ]
        assert _answered(lab.proxy_port), "the new trust entry applies"
        with pytest.raises(ConnectionRefusedError):  # the new listener does not
            socket.create_connection(("127.0.0.1", new_port), timeout=2).close()
        # Still pending: the next reload names them again, and nothing else.
        again = lab.reload()
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines() == restart
        lab.config.write_text(good)
        back = lab.reload()
        assert back.stdout.splitlines() == [
            "applied  proxy.upstream_timeout: 4.0 -> 1.5",
            "applied  proxy.route_advance_codes: [503] -> [408, 500, 502, 503, 504]",
            'applied  log.level: "info" -> "debug"',
        ]
        assert lab.reload().stdout.splitlines() == ["no changes"]
        assert lab.idle() == (0, 0)
    warnings = [line for line in lab.log.read_text().splitlines() if " WARNING " in line]
    assert any("listen changed: needs a restart" in w for w in warnings), warnings
    assert any("metrics.port changed: needs a restart" in w for w in warnings), warnings


@pytest.mark.sipp
@pytest.mark.slow
def test_reload_adds_an_emergency_number_for_the_next_invite(tmp_path: Path) -> None:
    lab = Lab.make(tmp_path, upstream_timeout=1.5, extra='[emergency]\nnumbers = ["911"]\n')
    with (
        lab.clearip(clearip_scenario(603), calls=2) as clearip,
        proxy_process(lab.config, lab.log) as process,
    ):
        before = lab.switch("before", uac_scenario(603), service="112")
        _final(before, 603)  # not an emergency yet: ClearIP decides
        assert wait_for(lambda: clearip.received("ACK "), 5, "ACK to ClearIP")
        lab.edit('numbers = ["911"]', 'numbers = ["911", "112"]')
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: lab.logged("reload: emergency.numbers"), 5, "the reload")
        listed = subprocess.run(
            [sys.executable, "-m", "clearip.ctl.cli", "--socket", lab.control, "emergency",
             "list", "--json"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert listed.stdout.strip() == '["112", "911"]', listed.stderr
        after = lab.switch("after", uac_scenario(503), service="112")
        assert "Emergency call: route directly" in _final(after, 503)
        assert len(clearip.received("INVITE ")) == 1, "the emergency call reached ClearIP"
        assert lab.idle() == (0, 0)
    assert lab.logged('reload: emergency.numbers: ["911"] -> ["911", "112"]')
