"""ClearIP liveness and fast reconnect (issue #15), end to end with the real daemon.

ClearIP is played by a small asyncio server in the test (real TLS with a certificate made by
trustme, or TCP) that answers the proxy's RFC 5626 pings or stays silent and can stop and start
listening on its port; by the project's emulator; and, over UDP, by a SIPp UAS answering
OPTIONS. The switch is a SIPp UAC. Every call placed ends with the switch holding its final
response and the proxy idle.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from clearip.relay.policy.trust import Role
from clearip.relay.sip.framing import PONG, Ping, StreamFramer
from lab.proxy_harness import SWITCH_IP, ThreadedProxy, threaded_proxy, wait_for, write_config
from lab.sipp import Sipp, free_port, start_sipp, uac_scenario

BLOCKED = "12125550199"
CLEARIP_UDP_IP = "127.0.0.5"  # not in the trust list: only the link makes its answers welcome


class StandIn:
    """ClearIP as an asyncio server in its own thread: TLS or TCP; answers pings (CRLF) or is
    silent (never sends a byte); stops and starts listening on the same port."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.port = free_port("tcp")
        self.answer_pings = True
        self.accepted = 0
        self.pings = 0
        self.received: list[bytes] = []  # SIP messages (the proxy's INVITEs)
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Transport] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def listen(self) -> float:
        """Accept connections again; returns the (wall clock) time it started listening."""

        async def start() -> float:
            self._server = await self.loop.create_server(
                lambda: _StandInConnection(self),
                "127.0.0.1",
                self.port,
                ssl=self.tls,
                reuse_address=True,
            )
            return time.time()

        listening: float = self._run(start())
        return listening

    def stop_listening(self, *, drop: bool) -> None:
        """New connections are refused from now on; ``drop``: also reset the open ones."""

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            if drop:
                for transport in list(self._open):
                    transport.abort()

        self._run(stop())

    def close(self) -> None:
        self.stop_listening(drop=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _StandInConnection(asyncio.Protocol):
    def __init__(self, owner: StandIn) -> None:
        self.owner = owner
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.accepted += 1
        self.owner._open.add(transport)

    def data_received(self, data: bytes) -> None:
        for item in self.framer.feed(data):
            if isinstance(item, Ping):
                self.owner.pings += 1
                if self.owner.answer_pings and self.transport is not None:
                    self.transport.write(PONG)
            elif isinstance(item, bytes):
                self.owner.received.append(item)  # never answered

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.owner._open.discard(self.transport)


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "clearip-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def _server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(params=["tls", "tcp"])
def stand_in(request: pytest.FixtureRequest, ca: tuple[trustme.CA, Path]) -> Iterator[StandIn]:
    server = StandIn(_server_context(ca[0]) if request.param == "tls" else None)
    server.listen()
    try:
        yield server
    finally:
        server.close()


def _config(
    directory: Path,
    proxy_port: int,
    upstream: str,
    *,
    interval: float,
    timeout: float,
    ca_file: Path | None = None,
    upstream_timeout: float = 8.0,
) -> Path:
    """The harness config with the link's keep-alive settings and a long upstream_timeout, so a
    call that fails open early can only have done so because the link went down."""
    path = write_config(directory, port=proxy_port, upstream=upstream, ca_file=str(ca_file or ""))
    text = path.read_text()
    text = text.replace(
        f'uri = "{upstream}"\n',
        f'uri = "{upstream}"\nkeepalive_interval = {interval}\nkeepalive_timeout = {timeout}\n',
    )
    text = text.replace("upstream_timeout = 1.5", f"upstream_timeout = {upstream_timeout}")
    path.write_text(text)
    return path


def _upstream(stand_in: StandIn) -> str:
    transport = "tls" if stand_in.tls is not None else "tcp"
    return f"sip:127.0.0.1:{stand_in.port};transport={transport}"


def _link(proxy: ThreadedProxy) -> dict[str, Any]:
    status: dict[str, Any] = proxy.call(lambda d: d.status()["upstreams"]["switch"])
    return status


def _calls(proxy: ThreadedProxy) -> list[tuple[float, dict[str, Any]]]:
    """Every call's summary from now on, with the (wall clock) time it finished."""
    seen: list[tuple[float, dict[str, Any]]] = []
    proxy.call(lambda d: d.call_listeners.append(lambda s: seen.append((time.time(), s))))
    return seen


def _summary(calls: list[tuple[float, dict[str, Any]]], index: int) -> tuple[float, dict[str, Any]]:
    """The ``index``-th call's (finish time, summary), once the proxy has logged it."""
    wait_for(lambda: len(calls) > index, 10, f"call {index + 1} to finish")
    return calls[index]


def _switch(directory: Path, proxy_port: int, expect: int, name: str, dialled: str) -> Sipp:
    return start_sipp(
        directory,
        name,
        uac_scenario(expect),
        local=(SWITCH_IP, free_port()),
        remote=("127.0.0.1", proxy_port),
        service=dialled,
    )


def _finish(switch: Sipp) -> None:
    assert switch.wait(30) == 0, switch.messages[-3000:]


@pytest.mark.sipp
def test_silent_clearip_is_declared_down_and_waiting_calls_fail_open(
    tmp_path: Path, stand_in: StandIn, ca: tuple[trustme.CA, Path]
) -> None:
    """ClearIP accepts the connection but stops answering pings: down within interval +
    timeout, the call waiting on it fails open at once, calls arriving meanwhile too, and the
    link reconnects when ClearIP listens again."""
    proxy_port = free_port()
    config = _config(
        tmp_path, proxy_port, _upstream(stand_in), interval=0.5, timeout=0.5, ca_file=ca[1]
    )
    with threaded_proxy(config) as proxy:
        assert _link(proxy)["state"] == "up"
        calls = _calls(proxy)
        # A call in ClearIP's hands: the stand-in swallows the INVITE (8 s upstream_timeout).
        waiting = _switch(tmp_path, proxy_port, 503, "waiting", "12125550100")
        wait_for(lambda: stand_in.received, 10, "the INVITE at ClearIP")
        assert not calls
        stand_in.stop_listening(drop=False)  # reconnecting will be refused...
        stand_in.answer_pings = False  # ...and the open connection goes silent
        silent_at = time.monotonic()
        wait_for(lambda: _link(proxy)["state"] != "up", 5, "the link to go down")
        assert time.monotonic() - silent_at <= 1.5  # the next ping, then its timeout
        assert proxy.counters()["clearip_keepalive_timeout"] >= 1
        assert _link(proxy)["down_reason"] == "no keep-alive answer within 0.5 s"
        _finish(waiting)
        (_, summary) = _summary(calls, 0)
        assert summary["final"] == 503
        assert summary["note"] == "fail-open: connection to ClearIP lost"
        assert summary["total_ms"] < 4000  # not the 8 s upstream_timeout
        # While it is down a new call fails open at once.
        _finish(_switch(tmp_path, proxy_port, 503, "meanwhile", "12125550100"))
        (_, summary) = _summary(calls, 1)
        assert summary["note"] == "fail-open: ClearIP unreachable"
        assert summary["total_ms"] < 500
        # ClearIP listens (and answers) again: a second connection, the link up again.
        stand_in.answer_pings = True
        stand_in.listen()
        wait_for(lambda: _link(proxy)["state"] == "up", 5, "the link to come back")
        assert stand_in.accepted == 2
        assert proxy.wait_idle(15) == (0, 0)


@pytest.mark.sipp
def test_answered_pings_keep_the_link_up_without_flapping(
    tmp_path: Path, stand_in: StandIn, ca: tuple[trustme.CA, Path]
) -> None:
    proxy_port = free_port()
    config = _config(
        tmp_path, proxy_port, _upstream(stand_in), interval=0.5, timeout=0.5, ca_file=ca[1]
    )
    with threaded_proxy(config) as proxy:
        deadline = time.monotonic() + 4.0  # eight keep-alive intervals
        while time.monotonic() < deadline:
            assert _link(proxy)["state"] == "up"
            time.sleep(0.1)
        assert stand_in.pings >= 6
        assert stand_in.accepted == 1
        assert proxy.counters().get("clearip_keepalive_timeout", 0) == 0
        assert proxy.wait_idle() == (0, 0)


def _emulator(directory: Path) -> Iterator[int]:
    (directory / "rules.toml").write_text(
        f'[[rule]]\nname = "block"\ndialled = "{BLOCKED}"\naction = "block"\nreason = "Robocall"\n'
    )
    ready = directory / "emulator-ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "clearip.relay.labkit.emulator",
         "--rules", str(directory / "rules.toml"),
         "--tcp", "127.0.0.1:0", "--ready-file", str(ready), "--quiet"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, 20, "the emulator")
        assert process.poll() is None, "the emulator did not start"
        yield int(json.loads(ready.read_text())["tcp"][0])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


@pytest.mark.sipp
def test_the_emulator_answers_pings_and_calls_over_one_connection(tmp_path: Path) -> None:
    """The project's own ClearIP emulator (its endpoint answers pings): up through many
    keep-alive cycles on one connection, and calls decided by it meanwhile."""
    proxy_port = free_port()
    for port in _emulator(tmp_path):
        upstream = f"sip:127.0.0.1:{port};transport=tcp"
        config = _config(tmp_path, proxy_port, upstream, interval=0.3, timeout=0.3)
        with threaded_proxy(config) as proxy:
            since = _link(proxy)["since"]
            for index in range(3):
                time.sleep(0.7)
                _finish(_switch(tmp_path, proxy_port, 603, f"switch{index}", BLOCKED))
            link = _link(proxy)
            assert (link["state"], link["since"]) == ("up", since)  # never reconnected
            assert proxy.counters().get("clearip_keepalive_timeout", 0) == 0
            assert proxy.wait_idle() == (0, 0)


def _options_uas(code: int) -> str:
    """ClearIP over UDP: answers each OPTIONS with ``code``, nothing else."""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="clearip-options-{code}">
  <recv request="OPTIONS" crlf="true"/>
  <send>
    <![CDATA[
SIP/2.0 {code} Whatever
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

    ]]>
  </send>
</scenario>
"""


@pytest.mark.sipp
def test_udp_clearip_is_probed_with_options(tmp_path: Path) -> None:
    """Up on the first answer, down after two unanswered probes (a call then fails open at
    once), up again at the next answer, whatever its status."""
    proxy_port = free_port()
    clearip_port = free_port(host=CLEARIP_UDP_IP)
    upstream = f"sip:{CLEARIP_UDP_IP}:{clearip_port};transport=udp"
    config = _config(tmp_path, proxy_port, upstream, interval=0.5, timeout=0.3)

    def clearip(name: str, code: int) -> Sipp:
        uas = start_sipp(
            tmp_path,
            name,
            _options_uas(code),
            local=(CLEARIP_UDP_IP, clearip_port),
            calls=100000,
            timeout=120,
        )
        time.sleep(0.3)
        return uas

    first = clearip("clearip", 200)
    try:
        with threaded_proxy(config) as proxy:
            assert _link(proxy)["state"] == "up"  # Daemon.start waited for the first answer
            calls = _calls(proxy)
            wait_for(lambda: len(first.received("OPTIONS ")) >= 3, 5, "three probes")
            probe = first.received("OPTIONS ")[0]
            assert probe.startswith(f"OPTIONS sip:{CLEARIP_UDP_IP}:{clearip_port} SIP/2.0")
            assert f"Via: SIP/2.0/UDP 127.0.0.1:{proxy_port};branch=z9hG4bKcio" in probe
            assert "Max-Forwards: 70" in probe and "CSeq: " in probe and ";tag=" in probe
            assert _link(proxy)["state"] == "up"
            first.stop()
            stopped = time.monotonic()
            wait_for(lambda: _link(proxy)["state"] == "down", 5, "the link to go down")
            # Two probes unanswered: at most two intervals plus the second one's timeout.
            assert time.monotonic() - stopped <= 2 * 0.5 + 0.3 + 0.5
            assert proxy.counters()["clearip_keepalive_timeout"] >= 1
            _finish(_switch(tmp_path, proxy_port, 503, "switch", "12125550100"))
            (_, summary) = _summary(calls, 0)
            assert summary["note"] == "fail-open: ClearIP unreachable"
            assert summary["total_ms"] < 500  # at once, not after upstream_timeout
            again = clearip("clearip-again", 404)  # any status proves ClearIP alive
            try:
                back = time.monotonic()
                wait_for(lambda: _link(proxy)["state"] == "up", 5, "the link to come back")
                assert time.monotonic() - back <= 0.5 + 0.5
                assert proxy.counters().get("stray_response", 0) == 0
                assert proxy.wait_idle() == (0, 0)
            finally:
                again.stop()
    finally:
        first.stop()


@pytest.mark.parametrize("outage", [4.0, pytest.param(95.0, marks=pytest.mark.slow)])
def test_link_is_up_within_two_seconds_of_clearip_listening_again(
    tmp_path: Path, ca: tuple[trustme.CA, Path], outage: float
) -> None:
    """However long ClearIP was away, the link is up within 2 s of it listening again. The
    outages fall between two attempts of the old back-off (0.5 s doubling to 30 s: attempts at
    3.5 s and 7.5 s, then 91.5 s and 121.5 s), which came back 3.5 s and 26 s late."""
    server = StandIn(_server_context(ca[0]))
    server.listen()
    try:
        proxy_port = free_port()
        config = _config(
            tmp_path, proxy_port, _upstream(server), interval=5.0, timeout=2.0, ca_file=ca[1]
        )
        with threaded_proxy(config) as proxy:
            assert _link(proxy)["state"] == "up"
            server.stop_listening(drop=True)  # ClearIP goes away
            wait_for(lambda: _link(proxy)["state"] != "up", 5, "the link to go down")
            time.sleep(outage)
            assert _link(proxy)["state"] != "up"
            listening = server.listen()
            wait_for(lambda: _link(proxy)["state"] == "up", 5, "the link to come back")
            up_at = _link(proxy)["since"]
            assert up_at - listening <= 2.0
            assert server.accepted == 2
            assert proxy.wait_idle() == (0, 0)
    finally:
        server.close()


@pytest.mark.sipp
def test_a_call_finding_the_link_down_makes_it_reconnect_now(tmp_path: Path) -> None:
    """With the back-off at a long cap, ClearIP listening again is noticed only when a call
    needs the link: that call fails open at once and the link is up right after it."""
    server = StandIn(None)
    server.listen()
    try:
        proxy_port = free_port()
        config = _config(tmp_path, proxy_port, _upstream(server), interval=5.0, timeout=2.0)
        with threaded_proxy(config) as proxy:
            assert _link(proxy)["state"] == "up"

            def slow_back_off(daemon: Any) -> None:
                machine = daemon.links[Role.SWITCH].machine
                machine.backoff = machine.backoff_cap = 30.0

            proxy.call(slow_back_off)
            calls = _calls(proxy)
            server.stop_listening(drop=True)
            wait_for(lambda: _link(proxy)["state"] == "down", 5, "the link to go down")
            server.listen()
            time.sleep(1.0)
            assert _link(proxy)["state"] == "down"  # the back-off alone waits 22 s or more
            _finish(_switch(tmp_path, proxy_port, 503, "switch", "12125550100"))
            wait_for(lambda: _link(proxy)["state"] == "up", 2, "the kicked reconnect")
            (finished, summary) = _summary(calls, 0)
            assert summary["note"] == "fail-open: ClearIP unreachable"
            assert _link(proxy)["since"] - finished < 0.5
            assert server.accepted == 2
            assert proxy.wait_idle() == (0, 0)
    finally:
        server.close()
