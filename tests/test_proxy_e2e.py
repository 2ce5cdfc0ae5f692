"""The in-line proxy end to end: real SIPp switch, ClearIP stand-in and providers on loopback.

Addresses: the switch is 127.0.0.1, providers 127.0.0.2 and 127.0.0.3 (trusted as providers),
127.0.0.9 is an untrusted host. ClearIP is played by SIPp over TCP here; the TLS leg with the
ClearIP emulator is covered in test_proxy_tls.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.proxy_harness import (
    PROVIDER_A_IP,
    PROVIDER_B_IP,
    SWITCH_IP,
    UNTRUSTED_IP,
    ThreadedProxy,
    proxy_process,
    threaded_proxy,
    wait_for,
    write_config,
)
from lab.sipp import (
    Sipp,
    clearip_scenario,
    free_port,
    sipp_uas,
    start_sipp,
    uac_cancel_scenario,
    uac_scenario,
    uas_scenario,
)

pytestmark = [pytest.mark.sipp, pytest.mark.slow]

DIALLED = "12125550100"


@dataclass
class Lab:
    dir: Path
    proxy_port: int
    clearip_port: int
    a_port: int
    b_port: int
    switch_port: int

    @property
    def upstream(self) -> str:
        return f"sip:127.0.0.1:{self.clearip_port};transport=tcp"

    def contact(self, ip: str, port: int) -> str:
        return f"sip:{DIALLED}@{ip}:{port}"

    def config(self, extra: str = "", upstream: str | None = None) -> Path:
        return write_config(
            self.dir, port=self.proxy_port, upstream=upstream or self.upstream, extra=extra
        )

    def switch(self, scenario: str, service: str = DIALLED, name: str = "switch") -> Sipp:
        return start_sipp(
            self.dir,
            name,
            scenario,
            local=(SWITCH_IP, self.switch_port),
            remote=("127.0.0.1", self.proxy_port),
            service=service,
        )

    def clearip(self, scenario: str, calls: int = 1) -> Iterator[Sipp]:
        return sipp_uas(
            self.dir,
            "clearip",
            scenario,
            local=("127.0.0.1", self.clearip_port),
            transport="t1",
            calls=calls,
        )

    def provider(self, name: str, ip: str, port: int, scenario: str) -> Iterator[Sipp]:
        return sipp_uas(self.dir, name, scenario, local=(ip, port))


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(
        tmp_path,
        proxy_port=free_port(),
        clearip_port=free_port("tcp"),
        a_port=free_port(host=PROVIDER_A_IP),
        b_port=free_port(host=PROVIDER_B_IP),
        switch_port=free_port(),
    )


def _run_switch(lab: Lab, scenario: str, service: str = DIALLED, timeout: float = 30) -> Sipp:
    switch = lab.switch(scenario, service)
    code = switch.wait(timeout)
    assert code == 0, f"switch scenario failed:\n{switch.messages[-3000:]}"
    return switch


def test_routed_call_identity_bye_and_reinvite(lab: Lab) -> None:
    contacts = [lab.contact(PROVIDER_A_IP, lab.a_port), lab.contact(PROVIDER_B_IP, lab.b_port)]
    with (
        lab.clearip(clearip_scenario(302, contacts)) as clearip,
        lab.provider(
            "a",
            PROVIDER_A_IP,
            lab.a_port,
            uas_scenario(200, reinvite=True, require="Identity: eyJ"),
        ) as a,
        threaded_proxy(lab.config()) as proxy,
    ):
        _run_switch(lab, uac_scenario(200, reinvite=True))
        assert a.wait(10) == 0, a.messages[-3000:]
        invite = a.received("INVITE sip:")[0]
        assert "Identity: eyJ" in invite
        assert f"Record-Route: <sip:127.0.0.1:{lab.proxy_port};lr>" in invite
        assert a.received("BYE "), "the BYE did not reach the provider"
        assert len(a.received("INVITE ")) == 2, "the re-INVITE did not reach the provider"
        assert clearip.received("ACK "), "the 302 was not ACKed hop by hop"
        assert proxy.wait_idle() == (0, 0)


def test_route_advance_on_503_and_on_silence(lab: Lab) -> None:
    contacts = [lab.contact(PROVIDER_A_IP, lab.a_port), lab.contact(PROVIDER_B_IP, lab.b_port)]
    with (
        lab.clearip(clearip_scenario(302, contacts), calls=2),
        lab.provider("a", PROVIDER_A_IP, lab.a_port, uas_scenario(503, ring=False)) as a,
        lab.provider("b", PROVIDER_B_IP, lab.b_port, uas_scenario(200)) as b,
        threaded_proxy(lab.config()) as proxy,
    ):
        _run_switch(lab, uac_scenario(200))
        assert a.received("ACK "), "503 from A was not ACKed"
        assert b.received("INVITE ")
        assert proxy.counters()["route_advance"] == 1
    # A silent: B gets the call after provider_timeout (1 s in this config).
    with (
        lab.clearip(clearip_scenario(302, contacts)),
        lab.provider("a2", PROVIDER_A_IP, lab.a_port, uas_scenario(0)),
        lab.provider("b2", PROVIDER_B_IP, lab.b_port, uas_scenario(200)) as b2,
        threaded_proxy(lab.config()) as proxy,
    ):
        started = time.monotonic()
        _run_switch(lab, uac_scenario(200))
        assert time.monotonic() - started >= 1.0
        assert b2.received("INVITE ")
        assert proxy.counters()["provider_timeout"] == 1


@pytest.mark.parametrize("code", [603, 503, 404])
def test_clearip_final_goes_back_to_switch(lab: Lab, code: int) -> None:
    headers = ['Reason: SIP;cause=603;text="Robocall"'] if code == 603 else []
    with (
        lab.clearip(clearip_scenario(code, headers=headers)) as clearip,
        threaded_proxy(lab.config()) as proxy,
    ):
        switch = _run_switch(lab, uac_scenario(code))
        final = switch.received(f"SIP/2.0 {code}")[0]
        if code == 603:
            assert 'Reason: SIP;cause=603;text="Robocall"' in final
        assert wait_for(lambda: clearip.received("ACK "), 5, "ACK to ClearIP")
        assert proxy.wait_idle() == (0, 0)


def test_clearip_silent_fails_open_after_timeout(lab: Lab) -> None:
    with (
        lab.clearip(uas_scenario(0)),
        threaded_proxy(lab.config()) as proxy,
    ):
        started = time.monotonic()
        switch = _run_switch(lab, uac_scenario(503))
        elapsed = time.monotonic() - started
        assert 1.4 <= elapsed < 5, elapsed
        assert "fail-open" in switch.received("SIP/2.0 503")[0]
        assert proxy.counters()["clearip_timeout"] == 1


def test_clearip_down_fails_open_at_once(lab: Lab) -> None:
    # Nothing listens on the ClearIP port.
    with threaded_proxy(lab.config()) as proxy:
        switch = _run_switch(lab, uac_scenario(503))
        assert "ClearIP unreachable" in switch.received("SIP/2.0 503")[0]
        summary = proxy.counters()
        assert summary["clearip_down_fail_open"] == 1


def test_proxy_answer_time_when_clearip_is_down(lab: Lab) -> None:
    with threaded_proxy(lab.config()) as proxy:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((SWITCH_IP, 0))
            sock.settimeout(2)
            invite = _raw_invite(DIALLED, sock.getsockname()[1])
            started = time.monotonic()
            sock.sendto(invite, ("127.0.0.1", lab.proxy_port))
            while True:
                data = sock.recv(4000)
                if not data.startswith(b"SIP/2.0 100"):
                    break
            elapsed = time.monotonic() - started
        assert data.startswith(b"SIP/2.0 503")
        assert elapsed < 0.1, f"503 took {elapsed * 1000:.0f} ms"
        assert proxy.counters()["clearip_down_fail_open"] == 1


def test_cancel_while_waiting_for_clearip_and_while_ringing(lab: Lab) -> None:
    with (
        lab.clearip(uas_scenario(0)),
        threaded_proxy(lab.config("", upstream=None)) as proxy,
    ):
        _run_switch(lab, uac_cancel_scenario(wait_for_ringing=False))
        assert proxy.wait_idle() == (0, 0)
    contacts = [lab.contact(PROVIDER_A_IP, lab.a_port)]
    ringing = uas_scenario(200, ring_ms=5000)
    with (
        lab.clearip(clearip_scenario(302, contacts)),
        lab.provider("a", PROVIDER_A_IP, lab.a_port, ringing) as a,
        threaded_proxy(lab.config()) as proxy,
    ):
        _run_switch(lab, uac_cancel_scenario(wait_for_ringing=True))
        assert wait_for(lambda: a.received("CANCEL "), 5, "CANCEL at the provider")
        assert proxy.wait_idle(15) == (0, 0)


@pytest.mark.parametrize("number", ["911", "933"])
def test_emergency_bypasses_clearip(lab: Lab, number: str) -> None:
    with (
        lab.clearip(clearip_scenario(603)) as clearip,
        threaded_proxy(lab.config()) as proxy,
    ):
        _run_switch(lab, uac_scenario(503), service=number)
        assert clearip.received("INVITE") == []
        assert proxy.counters()["emergency"] == 1
    route = f'[emergency]\nroute = "sip:psap@{PROVIDER_A_IP}:{lab.a_port}"\n'
    with (
        lab.provider("psap", PROVIDER_A_IP, lab.a_port, uas_scenario(200)) as psap,
        threaded_proxy(lab.config(route)),  # ClearIP is down here
    ):
        _run_switch(lab, uac_scenario(200), service=number)
        assert psap.received("INVITE sip:psap@")


def test_inbound_call_gets_pai_with_verstat(lab: Lab) -> None:
    pai = (
        'P-Asserted-Identity: "ACME PHARMA" '
        "<sip:+14045550100@clearip.example;verstat=TN-Validation-Passed>"
    )
    switch_port = free_port()
    contacts = [f"sip:{DIALLED}@{SWITCH_IP}:{switch_port}"]
    with (
        lab.clearip(clearip_scenario(302, contacts, headers=[pai])),
        sipp_uas(
            lab.dir,
            "switch-in",
            uas_scenario(200, require="verstat=TN-Validation-Passed"),
            local=(SWITCH_IP, switch_port),
        ) as switch_in,
        threaded_proxy(lab.config()) as proxy,
    ):
        carrier = start_sipp(
            lab.dir,
            "carrier",
            uac_scenario(200),
            local=(PROVIDER_A_IP, lab.a_port),
            remote=("127.0.0.1", lab.proxy_port),
            service=DIALLED,
        )
        assert carrier.wait(30) == 0, carrier.messages[-3000:]
        assert switch_in.wait(10) == 0
        invite = switch_in.received("INVITE ")[0]
        assert "verstat=TN-Validation-Passed" in invite
        assert proxy.counters()["invite_provider"] == 1


def test_untrusted_source_gets_nothing_and_reaches_nobody(lab: Lab) -> None:
    with (
        lab.clearip(clearip_scenario(302, [lab.contact(PROVIDER_A_IP, lab.a_port)])) as clearip,
        threaded_proxy(lab.config()) as proxy,
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((UNTRUSTED_IP, 0))
            sock.settimeout(1.0)
            sock.sendto(
                _raw_invite(DIALLED, sock.getsockname()[1], UNTRUSTED_IP),
                ("127.0.0.1", lab.proxy_port),
            )
            with pytest.raises(TimeoutError):
                sock.recv(4000)
        assert clearip.received("INVITE") == []
        assert proxy.counters()["untrusted_dropped"] == 1


def test_bye_crosses_a_proxy_restart(lab: Lab) -> None:
    contacts = [lab.contact(PROVIDER_A_IP, lab.a_port)]
    config = lab.config()
    with (
        lab.clearip(clearip_scenario(302, contacts)),
        lab.provider("a", PROVIDER_A_IP, lab.a_port, uas_scenario(200)) as a,
    ):
        log = lab.dir / "proxy.log"
        with proxy_process(config, log):
            switch = lab.switch(uac_scenario(200, hold_ms=4000))
            wait_for(lambda: a.received("ACK "), 15, "the call to be answered")
        # The proxy is gone; a new one starts on the same ports before the BYE.
        with proxy_process(config, log):
            assert switch.wait(30) == 0, switch.messages[-3000:]
            assert wait_for(lambda: a.received("BYE "), 5, "BYE at the provider")


def test_no_state_left_after_calls(lab: Lab) -> None:
    contacts = [lab.contact(PROVIDER_A_IP, lab.a_port)]
    with (
        lab.clearip(clearip_scenario(302, contacts), calls=5),
        sipp_uas(lab.dir, "a", uas_scenario(200), local=(PROVIDER_A_IP, lab.a_port), calls=5),
        threaded_proxy(lab.config()) as proxy,
    ):
        switch = start_sipp(
            lab.dir,
            "switch",
            uac_scenario(200),
            local=(SWITCH_IP, lab.switch_port),
            remote=("127.0.0.1", lab.proxy_port),
            service=DIALLED,
            calls=5,
            extra=["-r", "5"],
        )
        assert switch.wait(40) == 0, switch.messages[-2000:]
        assert proxy.wait_idle(40) == (0, 0)


def _raw_invite(number: str, port: int, ip: str = SWITCH_IP) -> bytes:
    return (
        f"INVITE sip:{number}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK-raw-{time.monotonic_ns()}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:14045550100@{ip}>;tag=raw1\r\n"
        f"To: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: raw-{time.monotonic_ns()}@{ip}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:switch@{ip}:{port}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


__all__ = ["ThreadedProxy"]
