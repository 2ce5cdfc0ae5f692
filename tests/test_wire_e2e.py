"""Correct on the wire with peers unlike our own (issue #15), real SIPp peers end to end:

- a switch that sends from an ephemeral port and listens on another, without ``rport``: every
  response goes where its Via says (RFC 3261 §18.2.2), checked with a drop rule that makes any
  answer to the sending port fail the call;
- a carrier whose responses carry only the proxy's Via: the switch still gets a well-formed
  final (or 2xx) with its own Via set (RFC 3261 §16.7 step 3 would drop such a response);
- the Via of the requests the proxy sends names the transport they go on, with a sent-by that
  reaches the proxy (RFC 3261 §18.1.1): TCP and UDP upstreams, TCP destinations, and TLS to
  ClearIP with no TLS listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from pyroute2 import netns

from lab.netns import loopback_namespace, ns_exec
from lab.proxy_harness import (
    PROVIDER_A_IP,
    PROVIDER_B_IP,
    SWITCH_IP,
    ThreadedProxy,
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
    uac_scenario,
    uas_scenario,
)

pytestmark = [pytest.mark.sipp, pytest.mark.slow]

DIALLED = "12125550100"


def _switch_listening_elsewhere(listen_port: int, expect: int) -> str:
    """A switch scenario whose Via, Contact and From name ``listen_port`` while SIPp (``-t un``)
    sends every call from a socket of its own on an ephemeral port; no ``rport``."""
    return uac_scenario(expect).replace("[local_port]", str(listen_port))


@contextlib.contextmanager
def _inside(ns: str) -> Iterator[None]:
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


def _nft(ns: str, *commands: str) -> str:
    out = ""
    for command in commands:
        out = subprocess.run(
            [*ns_exec(ns), "nft", *command.split()], check=True, capture_output=True, text=True
        ).stdout
    return out


@pytest.mark.root
@pytest.mark.netns
def test_switch_sending_from_an_ephemeral_port_is_answered_where_it_listens(
    tmp_path: Path,
) -> None:
    proxy_port, clearip_port, a_port, switch_port = 5060, 5070, 5080, 5090
    with loopback_namespace() as lo:
        ns = lo.ns
        # Anything the proxy sends to the switch's address on another port than the one its
        # Via names is dropped and counted: answering the source port fails the call.
        _nft(
            ns,
            "add table inet wire",
            "add chain inet wire in { type filter hook input priority 0 ; }",
            f"add rule inet wire in ip daddr {SWITCH_IP} udp sport {proxy_port} "
            f"udp dport != {switch_port} counter drop",
        )
        contacts = [f"sip:{DIALLED}@{PROVIDER_A_IP}:{a_port}"]
        config = write_config(
            tmp_path, port=proxy_port, upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp"
        )
        with (
            sipp_uas(
                tmp_path, "clearip", clearip_scenario(302, contacts),
                local=("127.0.0.1", clearip_port), transport="t1", prefix=ns_exec(ns),
            ) as clearip,
            sipp_uas(
                tmp_path, "a", uas_scenario(200), local=(PROVIDER_A_IP, a_port),
                prefix=ns_exec(ns),
            ) as carrier,
        ):  # fmt: skip
            with _inside(ns):
                proxy = ThreadedProxy(config).start()
            try:
                switch = start_sipp(
                    tmp_path,
                    "switch",
                    _switch_listening_elsewhere(switch_port, 200),
                    local=(SWITCH_IP, switch_port),
                    remote=("127.0.0.1", proxy_port),
                    transport="un",
                    service=DIALLED,
                    prefix=ns_exec(ns),
                    extra=["-max_socket", "100"],
                )
                assert switch.wait(30) == 0, switch.messages[-3000:]
                invite = clearip.received("INVITE ")[0]
                sent_from = re.search(r"received=([\d.]+)", invite)
                assert f"Via: SIP/2.0/UDP {SWITCH_IP}:{switch_port};branch=" in invite
                assert sent_from is None, "same address: no received parameter expected"
                assert carrier.received("BYE "), "the BYE did not reach the carrier"
                assert proxy.wait_idle() == (0, 0)
            finally:
                proxy.stop()
        dropped = _nft(ns, "list table inet wire")
        assert re.search(r"counter packets 0 bytes 0 drop", dropped), dropped


def _only_our_via_uas(final: int) -> str:
    """A sloppy carrier: its responses keep only the top Via (the proxy's), not the set."""
    grab = (
        '  <recv request="INVITE" crlf="true">\n'
        '    <action><ereg regexp="Via: (SIP/2.0/[A-Z]+ [^\\r\\n]*z9hG4bKcip[^\\r\\n]*)" '
        'search_in="msg" check_it="true" assign_to="whole,ourvia"/></action>\n'
        "  </recv>\n"
        '  <Reference variables="whole"/>\n'
    )
    scenario = uas_scenario(final)
    scenario = scenario.replace('  <recv request="INVITE" crlf="true">\n  </recv>\n', grab)
    scenario = scenario.replace('  <recv request="INVITE" crlf="true"/>\n', grab, 1)
    # Only the INVITE's responses are sloppy; the BYE's 200 is answered normally.
    head, ack, tail = scenario.partition('<recv request="ACK"')
    return head.replace("[last_Via:]", "Via: [$ourvia]") + ack + tail


@pytest.mark.parametrize("final", [200, 486])
def test_carrier_responses_with_only_our_via_still_reach_the_switch(
    tmp_path: Path, final: int
) -> None:
    proxy_port, clearip_port = free_port(), free_port("tcp")
    a_port, switch_port = free_port(host=PROVIDER_A_IP), free_port()
    contacts = [f"sip:{DIALLED}@{PROVIDER_A_IP}:{a_port}"]
    config = write_config(
        tmp_path, port=proxy_port, upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp"
    )
    with (
        sipp_uas(
            tmp_path, "clearip", clearip_scenario(302, contacts),
            local=("127.0.0.1", clearip_port), transport="t1",
        ),
        sipp_uas(tmp_path, "a", _only_our_via_uas(final), local=(PROVIDER_A_IP, a_port)) as a,
        threaded_proxy(config) as proxy,
    ):  # fmt: skip
        switch = start_sipp(
            tmp_path,
            "switch",
            uac_scenario(final),
            local=(SWITCH_IP, switch_port),
            remote=("127.0.0.1", proxy_port),
            service=DIALLED,
        )
        assert switch.wait(30) == 0, switch.messages[-3000:]
        sent_by = f"Via: SIP/2.0/UDP {SWITCH_IP}:{switch_port};branch="
        # The carrier really dropped the switch's Via ...
        replies = [m for m in a.messages.split("message sent")[1:] if "SIP/2.0 18" in m[:200]]
        assert replies and all(sent_by not in m for m in replies)
        # ... and the switch got its responses with its own Via set all the same.
        answer = switch.received(f"SIP/2.0 {final}")[0]
        assert sent_by in answer
        assert len(re.findall(r"^Via:", answer, re.M)) == 1
        if final == 200:
            assert "Content-Type: application/sdp" in answer, "the 2xx must keep its SDP"
            assert wait_for(lambda: a.received("BYE "), 5, "BYE at the carrier")
        else:
            assert ";tag=" in answer.split("To:", 1)[1].split("\n", 1)[0]
        assert proxy.counters()["response_via_repaired"] >= 1
        # The carrier's client transaction ends with Timer D (32 s over UDP) after a non-2xx.
        assert proxy.wait_idle(timeout=40) == (0, 0)


def _upstream_invite_via(sipp: Sipp) -> str:
    invite = sipp.received("INVITE ")[0]
    return next(line for line in invite.splitlines() if line.startswith("Via:"))


def test_via_names_the_transport_of_each_leg(tmp_path: Path) -> None:
    """ClearIP over TCP and a carrier Contact over TCP: each INVITE's top Via says TCP and
    names the proxy's TCP listener; over UDP it says UDP."""
    proxy_port, clearip_port = free_port(), free_port("tcp")
    b_port = free_port("tcp", host=PROVIDER_B_IP)
    contacts = [f"sip:{DIALLED}@{PROVIDER_B_IP}:{b_port};transport=tcp"]
    config = write_config(
        tmp_path, port=proxy_port, upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp"
    )
    with (
        sipp_uas(
            tmp_path, "clearip", clearip_scenario(302, contacts),
            local=("127.0.0.1", clearip_port), transport="t1",
        ) as clearip,
        sipp_uas(
            tmp_path, "b", uas_scenario(200), local=(PROVIDER_B_IP, b_port), transport="t1"
        ) as b,
        threaded_proxy(config) as proxy,
    ):  # fmt: skip
        switch = start_sipp(
            tmp_path, "switch", uac_scenario(200), local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port), service=DIALLED,
        )  # fmt: skip
        assert switch.wait(30) == 0, switch.messages[-3000:]
        assert _upstream_invite_via(clearip).startswith(
            f"Via: SIP/2.0/TCP 127.0.0.1:{proxy_port};branch=z9hG4bKcip"
        )
        assert _upstream_invite_via(b).startswith(
            f"Via: SIP/2.0/TCP 127.0.0.1:{proxy_port};branch=z9hG4bKcip"
        )
        assert proxy.wait_idle() == (0, 0)
    # A UDP upstream: the INVITE says UDP.
    config = write_config(
        tmp_path, port=proxy_port, upstream=f"sip:127.0.0.1:{clearip_port};transport=udp"
    )
    with (
        sipp_uas(
            tmp_path,
            "clearip-udp",
            clearip_scenario(503),
            local=("127.0.0.1", clearip_port),
            extra=["-aa"],  # answers the relay's OPTIONS liveness probes
        ) as clearip_udp,
        threaded_proxy(config) as proxy,
    ):
        switch = start_sipp(
            tmp_path, "switch-udp", uac_scenario(503), local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port), service=DIALLED,
        )  # fmt: skip
        assert switch.wait(30) == 0, switch.messages[-3000:]
        assert _upstream_invite_via(clearip_udp).startswith(
            f"Via: SIP/2.0/UDP 127.0.0.1:{proxy_port};branch=z9hG4bKcip"
        )
        assert proxy.wait_idle(timeout=40) == (0, 0)  # Timer D: 32 s after a UDP non-2xx


class _TlsClearIP:
    """A ClearIP stand-in over TLS that records each INVITE's top Via and the address the
    connection came from, and answers 503 on the same connection."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.vias: list[str] = []
        self.peers: list[tuple[str, int]] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.strip() == b"":
                    continue
                text = head.decode()
                length = re.search(r"(?im)^content-length:\s*(\d+)", text)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if not text.startswith("INVITE "):
                    continue
                self.vias.append(re.search(r"(?m)^Via: ([^\r\n]*)", text).group(1))  # type: ignore[union-attr]
                self.peers.append((str(peer[0]), int(peer[1])))
                keep = [
                    line
                    for line in text.split("\r\n")
                    if line.split(":", 1)[0] in ("Via", "From", "To", "Call-ID", "CSeq")
                ]
                reply = "SIP/2.0 503 Service Unavailable\r\n" + "\r\n".join(keep)
                writer.write((reply + "\r\nContent-Length: 0\r\n\r\n").encode())
                await writer.drain()

    def __enter__(self) -> _TlsClearIP:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_tls_to_clearip_without_a_tls_listener_says_tls(tmp_path: Path) -> None:
    """The packaged default: ClearIP over TLS, no TLS listener. The INVITE's Via says TLS and
    its sent-by is the connection's own address (where ClearIP's answers arrive)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy_port = free_port()
    with _TlsClearIP(context) as clearip:
        config = write_config(
            tmp_path,
            port=proxy_port,
            upstream=f"sip:127.0.0.1:{clearip.port};transport=tls",
            ca_file=str(ca_file),
        )
        with threaded_proxy(config) as proxy:
            switch = start_sipp(
                tmp_path, "switch", uac_scenario(503), local=(SWITCH_IP, free_port()),
                remote=("127.0.0.1", proxy_port), service=DIALLED,
            )  # fmt: skip
            assert switch.wait(30) == 0, switch.messages[-3000:]
            assert clearip.vias, "ClearIP got no INVITE"
            host, port = clearip.peers[0]
            assert clearip.vias[0].startswith(f"SIP/2.0/TLS {host}:{port};branch=z9hG4bKcip")
            assert proxy.wait_idle() == (0, 0)


def test_contacts_are_sorted_by_q_before_max_contacts_cuts(tmp_path: Path) -> None:
    """ClearIP lists the worst Contact first; with max_contacts = 1 the best one is called."""
    proxy_port, clearip_port = free_port(), free_port("tcp")
    a_port, b_port = free_port(host=PROVIDER_A_IP), free_port(host=PROVIDER_B_IP)
    contacts = (
        f"Contact: <sip:{DIALLED}@{PROVIDER_A_IP}:{a_port}>;q=0.1, "
        f"<sip:{DIALLED}@{PROVIDER_B_IP}:{b_port}>;q=0.9"
    )
    config = write_config(
        tmp_path,
        port=proxy_port,
        upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp",
        extra="",
    )
    config.write_text(config.read_text().replace("[proxy]\n", "[proxy]\nmax_contacts = 1\n", 1))
    with (
        sipp_uas(
            tmp_path, "clearip", clearip_scenario(302, [], headers=[contacts]),
            local=("127.0.0.1", clearip_port), transport="t1",
        ),
        sipp_uas(tmp_path, "a", uas_scenario(200), local=(PROVIDER_A_IP, a_port)) as a,
        sipp_uas(tmp_path, "b", uas_scenario(200), local=(PROVIDER_B_IP, b_port)) as b,
        threaded_proxy(config) as proxy,
    ):  # fmt: skip
        switch = start_sipp(
            tmp_path, "switch", uac_scenario(200), local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", proxy_port), service=DIALLED,
        )  # fmt: skip
        assert switch.wait(30) == 0, switch.messages[-3000:]
        assert b.received("INVITE "), "the q=0.9 Contact was not called"
        assert not a.received("INVITE "), "the q=0.1 Contact was called"
        assert proxy.wait_idle() == (0, 0)
