"""Misbehaving providers behind the real relay: the switch always gets exactly one final.

The relay runs in a thread (its counters and tables are read directly), ClearIP is the real
emulator over TCP routing to the providers under test, the switch is SIPp. Providers are SIPp
or Python peers (tests/reliability.py) where SIPp cannot misbehave the way we need: silent,
slow, 5xx on every call, responses with a forged branch or Call-ID, a TCP peer that closes
its connection in the middle of a dialog.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.proxy_harness import (
    PROVIDER_A_IP,
    PROVIDER_B_IP,
    SWITCH_IP,
    ThreadedProxy,
    threaded_proxy,
    wait_for,
    write_config,
)
from lab.reliability import UdpPeer, answer, any_final_uac, emulator, outcomes, sdp, settled
from lab.sipp import Sipp, free_port, sipp_uas, start_sipp, uac_scenario, uas_scenario
from tests.test_faults import FakeClearIP

pytestmark = [pytest.mark.sipp, pytest.mark.slow]

DIALLED = "12125550100"


def _rules(contacts: list[str]) -> str:
    quoted = ", ".join(f'"{c}"' for c in contacts)
    return f'[[rule]]\nname = "route"\naction = "route"\ncontacts = [{quoted}]\n'


@contextlib.contextmanager
def relay(tmp_path: Path, contacts: list[str]) -> Iterator[tuple[int, ThreadedProxy]]:
    """Emulator routing every call to ``contacts`` in order, and the relay in front of it."""
    with emulator(tmp_path, _rules(contacts)) as ports:
        port = free_port()
        config = write_config(
            tmp_path, port=port, upstream=f"sip:127.0.0.1:{ports['tcp']};transport=tcp"
        )
        with threaded_proxy(config) as proxy:
            yield port, proxy


def _switch(tmp_path: Path, port: int, scenario: str, name: str = "switch", **kw: object) -> Sipp:
    return start_sipp(
        tmp_path,
        name,
        scenario,
        local=(SWITCH_IP, free_port()),
        remote=("127.0.0.1", port),
        service=DIALLED,
        **kw,  # type: ignore[arg-type]
    )


def _passes(switch: Sipp, timeout: float = 30) -> Sipp:
    assert switch.wait(timeout) == 0, switch.messages[-3000:]
    return switch


def _silent(sock: socket.socket, data: bytes, address: tuple[str, int], peer: UdpPeer) -> None:
    """Receives everything, answers nothing."""


def test_silent_provider_gets_the_switch_a_408(tmp_path: Path) -> None:
    with UdpPeer(PROVIDER_A_IP, _silent) as a:
        with relay(tmp_path, [f"sip:{{dialled}}@{a.host}:{a.port}"]) as (port, proxy):
            started = time.monotonic()
            switch = _passes(_switch(tmp_path, port, uac_scenario(408)))
            elapsed = time.monotonic() - started
            assert 1.0 <= elapsed < 5, elapsed  # provider_timeout is 1 s
            assert "No destination answered" in switch.received("SIP/2.0 408")[0]
            assert proxy.counters()["provider_timeout"] == 1
            assert proxy.counters()["call:switch:408:timeout"] == 1
            assert proxy.wait_idle(15) == (0, 0)
        assert a.requests("INVITE"), "the silent provider never got the INVITE"


def test_slow_provider_is_skipped_and_its_late_200_never_reaches_the_switch(
    tmp_path: Path,
) -> None:
    def slow(sock: socket.socket, data: bytes, address: tuple[str, int], peer: UdpPeer) -> None:
        if data.startswith(b"INVITE") and len(peer.requests("INVITE")) == 1:
            time.sleep(1.4)  # provider_timeout is 1 s: the relay has moved on
            sock.sendto(answer(data, 100, "Trying"), address)
            contact = f"Contact: <sip:slow@{peer.host}:{peer.port}>"
            sock.sendto(
                answer(data, 200, "OK", tag="slow", extra=contact, body=sdp(peer.host)), address
            )

    b_port = free_port(host=PROVIDER_B_IP)
    with (
        UdpPeer(PROVIDER_A_IP, slow) as a,
        sipp_uas(tmp_path, "b", uas_scenario(200), local=(PROVIDER_B_IP, b_port)) as b,
        relay(
            tmp_path,
            [f"sip:{{dialled}}@{a.host}:{a.port}", f"sip:{{dialled}}@{PROVIDER_B_IP}:{b_port}"],
        ) as (port, proxy),
    ):
        switch = _passes(_switch(tmp_path, port, uac_scenario(200, hold_ms=1000)))
        assert b.wait(10) == 0, b.messages[-2000:]
        wait_for(lambda: proxy.counters()["late_2xx_abandoned_branch"] >= 1, 5, "the late 200")
        counters = proxy.counters()
        assert counters["provider_timeout"] == 1 and counters["route_advance"] == 1
        finals = switch.received("SIP/2.0 200")
        assert finals and all("tag=slow" not in f for f in finals), finals
        assert not a.errors, a.errors
        assert proxy.wait_idle(15) == (0, 0)


def _storm_peer(code: int, reason: str) -> UdpPeer:
    def failing(sock: socket.socket, data: bytes, address: tuple[str, int], peer: UdpPeer) -> None:
        if data.startswith(b"INVITE"):
            sock.sendto(answer(data, code, reason, tag=f"storm{code}"), address)

    return UdpPeer(PROVIDER_A_IP if code == 500 else PROVIDER_B_IP, failing)


def test_5xx_storm_every_destination_fails_and_every_call_gets_one_final(tmp_path: Path) -> None:
    calls = 20
    with (
        _storm_peer(500, "Server Internal Error") as a,
        _storm_peer(503, "Service Unavailable") as b,
        _storm_peer(503, "Service Unavailable") as c,
    ):
        contacts = [f"sip:{{dialled}}@{p.host}:{p.port}" for p in (a, b, c)]
        with relay(tmp_path, contacts) as (port, proxy):
            switch = _switch(
                tmp_path, port, any_final_uac(), calls=calls, extra=["-r", "20", "-l", "20"]
            )
            _passes(switch, 40)
            seen = outcomes(switch)
            assert len(seen.invites) == calls and not seen.unanswered
            # The best of 500/503/503 is 500 (a downstream 503 becomes 500, RFC 3261 §16.7).
            assert seen.by_status() == {500: calls}
            counters = proxy.counters()
            assert counters["route_advance"] == 2 * calls
            assert counters["call:switch:500:relayed"] == calls
            assert set(settled(proxy)) <= {"client:COMPLETED"}
        for peer in (a, b, c):
            assert len(peer.requests("INVITE")) >= calls
            assert len(peer.requests("ACK")) >= calls, "a 5xx was not ACKed hop by hop"


def _forger(**forge: str) -> UdpPeer:
    """A provider that sends 180 and 200 with ``forge`` (branch= or call_id=) changed, so
    they belong to no transaction of ours, then the real final: 486."""

    def forger(sock: socket.socket, data: bytes, address: tuple[str, int], peer: UdpPeer) -> None:
        if data.startswith(b"INVITE"):
            sock.sendto(answer(data, 100, "Trying"), address)
            contact = f"Contact: <sip:forged@{peer.host}:{peer.port}>"
            for status, reason in ((180, "Ringing"), (200, "OK")):
                sock.sendto(
                    answer(data, status, reason, tag="forged", extra=contact, **forge), address
                )
            time.sleep(0.2)
            sock.sendto(answer(data, 486, "Busy Here", tag="real"), address)

    return UdpPeer(PROVIDER_A_IP, forger)


def test_response_with_a_wrong_branch_is_a_counted_stray_never_relayed(tmp_path: Path) -> None:
    with (
        _forger(branch="z9hG4bK-forged") as a,
        relay(tmp_path, [f"sip:{{dialled}}@{a.host}:{a.port}"]) as (port, proxy),
    ):
        switch = _passes(_switch(tmp_path, port, uac_scenario(486)))
        assert not switch.received("SIP/2.0 180") and not switch.received("SIP/2.0 200")
        assert "tag=forged" not in switch.messages
        assert proxy.counters()["stray_response"] == 2
        assert proxy.counters()["call:switch:486:relayed"] == 1
        assert set(settled(proxy)) <= {"client:COMPLETED"}


def test_response_with_a_wrong_call_id_is_a_counted_stray_never_relayed(tmp_path: Path) -> None:
    with (
        _forger(call_id="forged@x") as a,
        relay(tmp_path, [f"sip:{{dialled}}@{a.host}:{a.port}"]) as (port, proxy),
    ):
        switch = _switch(tmp_path, port, uac_scenario(486), timeout=8)
        try:
            wait_for(lambda: proxy.counters().get("call:switch:486:relayed", 0), 5, "the 486")
        finally:
            # Read before failing: with the bug the switch never gets a final and would wait.
            assert "forged@x" not in switch.messages, "a forged Call-ID reached the switch"
        assert switch.wait(10) == 0, switch.messages[-3000:]
        assert proxy.counters()["stray_response"] == 2
        assert set(settled(proxy)) <= {"client:COMPLETED"}


def _tcp_provider(close_listener: list[FakeClearIP]) -> FakeClearIP:
    """A provider over TCP: answers the INVITE 200, closes the connection on the ACK, and
    answers a BYE (on whatever new connection it comes) 200."""

    def behave(conn: socket.socket, data: bytes, fake: FakeClearIP) -> None:
        if data.startswith(b"INVITE"):
            conn.sendall(answer(data, 100, "Trying"))
            contact = f"Contact: <sip:carrier@127.0.0.1:{fake.port};transport=tcp>"
            conn.sendall(answer(data, 200, "OK", tag="tcp", extra=contact, body=sdp("127.0.0.1")))
        elif data.startswith(b"ACK"):
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            if close_listener:
                close_listener[0].__exit__(None, None, None)  # gone for good
            raise OSError("closed on purpose")
        elif data.startswith(b"BYE"):
            conn.sendall(answer(data, 200, "OK"))

    fake = FakeClearIP(behave)
    return fake


def test_tcp_provider_closing_mid_dialog_gets_its_bye_on_a_new_connection(tmp_path: Path) -> None:
    with _tcp_provider([]) as fake:
        contact = f"sip:{{dialled}}@127.0.0.1:{fake.port};transport=tcp"
        with relay(tmp_path, [contact]) as (port, proxy):
            _passes(_switch(tmp_path, port, uac_scenario(200, hold_ms=500)))
            assert fake.connections == 2, "the BYE did not come on a new connection"
            assert [m.split(b" ", 1)[0] for m in fake.received] == [b"INVITE", b"ACK", b"BYE"]
            counters = proxy.counters()
            assert counters["in_dialog_bye"] == 1 and counters.get("send_failed", 0) == 0
            assert proxy.wait_idle(15) == (0, 0)


def test_tcp_provider_gone_mid_dialog_fails_the_bye_cleanly(tmp_path: Path) -> None:
    gone: list[FakeClearIP] = []
    with _tcp_provider(gone) as fake:
        gone.append(fake)
        contact = f"sip:{{dialled}}@127.0.0.1:{fake.port};transport=tcp"
        with relay(tmp_path, [contact]) as (port, proxy):
            switch = _switch(tmp_path, port, uac_scenario(200, hold_ms=300))
            try:
                wait_for(lambda: proxy.counters().get("send_failed", 0) >= 1, 15, "the BYE to fail")
                assert proxy.counters()["in_dialog_bye"] >= 1
                seen = outcomes(switch)
                assert seen.finals and not seen.bye_ok, "nobody could have answered that BYE"
            finally:
                switch.stop()
            # Nothing is left behind, and the next call to the dead provider gets a clean 503.
            assert proxy.wait_idle(15) == (0, 0)
            after = _passes(_switch(tmp_path, port, uac_scenario(503), name="after"))
            assert "unreachable" in after.received("SIP/2.0 503")[0]
