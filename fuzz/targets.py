"""Fuzz targets: the message parser and the relay's datagram path (parse + proxy core).

Each target takes arbitrary bytes. The only exception allowed out of the parser is the stack's
own :class:`SipParseError`; the datagram path must swallow everything the way the endpoint
does (400 or drop) and never raise at all.
"""

from __future__ import annotations

from collections import Counter

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.core import ProxyCore
from clearip.relay.proxy.routing import Locality
from clearip.relay.sip.badrequest import build_bad_request
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.framing import StreamFramer
from clearip.relay.sip.parser import parse_message
from clearip.relay.transport.peer import LocalAddress, Peer

SOURCE = Peer("udp", "192.0.2.10", 5060)
UPSTREAM = Peer("tls", "198.51.100.1", 5061, conn=1)


def parser(data: bytes) -> None:
    try:
        message = parse_message(data)
    except SipParseError:
        build_bad_request(data, "fuzz")
        return
    message.to_bytes()
    try:
        message.top_via  # noqa: B018 - lazily parsed fields must fail typed, too
        message.cseq  # noqa: B018
        message.from_tag  # noqa: B018
        message.addresses("contact")
        message.addresses("route")
    except SipParseError:
        pass


def framer(data: bytes) -> None:
    framer = StreamFramer()
    try:
        for start in range(0, len(data), 7):
            framer.feed(data[start : start + 7])
    except SipParseError:
        pass


def _core() -> ProxyCore:
    return ProxyCore(
        ProxyConfig(),
        role_of=lambda ip: Role.SWITCH,
        emergency=EmergencyNumbers,
        locality=Locality(hosts={"203.0.113.5"}, ports={5060}),
        local_for=lambda peer, record_route=False: LocalAddress(
            peer.transport, "203.0.113.5", 5060
        ),
        upstream=lambda role: UPSTREAM,
        clock=lambda: 0.0,
        counters=Counter(),
    )


CORE = _core()


def datagram(data: bytes) -> None:
    """What SipEndpoint.message_received does with a datagram, minus the socket."""
    try:
        message = parse_message(data)
    except SipParseError:
        build_bad_request(data, "fuzz")
        return
    try:
        CORE.on_message(message, SOURCE)
        CORE.on_message(message, UPSTREAM)  # the same bytes as if ClearIP had sent them
    except SipParseError:
        pass
    if len(CORE.calls) > 1000:  # keep memory bounded across millions of inputs
        CORE.calls.clear()
        CORE.server_txns.clear()
        CORE.client_txns.clear()
        CORE.by_server_key.clear()


TARGETS = {"parser": parser, "framer": framer, "datagram": datagram}
