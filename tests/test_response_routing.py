"""Where responses go (RFC 3261 §18.2.2, RFC 3581): pure cases of ``response_peer``."""

from __future__ import annotations

import pytest

from clearip.relay.sip.message import Request
from clearip.relay.sip.parser import parse_message
from clearip.relay.transport.peer import Peer, response_peer

SOURCE_UDP = Peer("udp", "192.0.2.10", 40000)


def _request(via: str) -> Request:
    text = (
        f"INVITE sip:1@example.net SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
        "From: <sip:a@x>;tag=1\r\nTo: <sip:1@example.net>\r\nCall-ID: rr1\r\n"
        "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


@pytest.mark.parametrize(
    ("via", "source", "expected"),
    [
        # sent-by port, not the source port, when rport was not asked for
        ("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK1", SOURCE_UDP, ("192.0.2.10", 5060)),
        # no port in sent-by: 5060
        ("SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1", SOURCE_UDP, ("192.0.2.10", 5060)),
        # received (behind NAT): the source address, still the sent-by port
        ("SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK1", SOURCE_UDP, ("192.0.2.10", 5070)),
        (
            "SIP/2.0/UDP 10.0.0.1:5070;received=192.0.2.10;branch=z9hG4bK1",
            SOURCE_UDP,
            ("192.0.2.10", 5070),
        ),
        # rport asked for: the source port (stamped or not yet stamped)
        ("SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bK1", SOURCE_UDP, ("192.0.2.10", 40000)),
        (
            "SIP/2.0/UDP 10.0.0.1:5060;rport=40000;received=192.0.2.10;branch=z9hG4bK1",
            SOURCE_UDP,
            ("192.0.2.10", 40000),
        ),
        # maddr wins, with the sent-by port
        (
            "SIP/2.0/UDP 10.0.0.1:5062;maddr=192.0.2.77;branch=z9hG4bK1",
            SOURCE_UDP,
            ("192.0.2.77", 5062),
        ),
    ],
)
def test_udp_responses_follow_the_via(via: str, source: Peer, expected: tuple[str, int]) -> None:
    peer = response_peer(_request(via), source)
    assert (peer.transport, peer.host, peer.port) == ("udp", *expected)


def test_streams_answer_on_the_connection_and_fall_back_to_sent_by() -> None:
    source = Peer("tcp", "192.0.2.10", 40001, conn=7)
    peer = response_peer(_request("SIP/2.0/TCP 10.0.0.1:5080;rport;branch=z9hG4bK1"), source)
    # The same connection first; if it is gone, a new one to received + sent-by port (rport
    # does not apply to reliable transports, RFC 3581 §4).
    assert peer == Peer("tcp", "192.0.2.10", 5080, conn=7)
    tls = response_peer(_request("SIP/2.0/TLS sbc.example.net;branch=z9hG4bK1"), source)
    assert (tls.host, tls.port, tls.conn) == ("192.0.2.10", 5061, 7)
