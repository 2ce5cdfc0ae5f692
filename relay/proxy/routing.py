"""Via, Record-Route and loose routing without per-dialog state (RFC 3261 §16.4-§16.7, §16.12).

Rules this module keeps:

- Every request we forward gets our Via on top. Stateful branches (INVITE towards ClearIP and
  the destinations) are unique and carry a loop-detection hash (§16.6 step 8); stateless
  branches (in-dialog requests) are a hash of the incoming request, so a retransmission gets
  the same branch and the next hop absorbs it.
- When a request came over a stream, our Via remembers the connection (``cid``) so the
  response can go back on it without any state here.
- Record-Route carries our advertised address with ``lr``; when the transport changes between
  the two legs we record-route twice (RFC 5658) so each side sees an address it can reach.
- In-dialog requests are routed by their Route headers alone: we pop the Route entries that
  name us and send to the next one, or to the Request-URI. A restarted process, or another
  worker, routes the BYE of a call it never saw.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from clearip.relay.sip.address import Address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.uri import SipUri, parse_uri
from clearip.relay.sip.via import DEFAULT_PORTS, MAGIC_COOKIE, Via
from clearip.relay.transport.peer import LocalAddress, Peer

STATEFUL_PREFIX = MAGIC_COOKIE + "cip"
STATELESS_PREFIX = MAGIC_COOKIE + "cis"
MAX_FORWARDS_DEFAULT = 70


def _digest(*parts: object, size: int = 8) -> str:
    data = "|".join(map(str, parts)).encode("utf-8", "surrogateescape")
    return hashlib.blake2s(data, digest_size=size).hexdigest()


def loop_hash(request: Request) -> str:
    """Identifies the request as this proxy last saw it (§16.6 step 8, §16.3 step 4)."""
    return _digest(request.uri_text, request.from_tag, request.call_id, request.cseq[0], size=5)


def stateful_branch(request: Request) -> str:
    return f"{STATEFUL_PREFIX}{loop_hash(request)}.{secrets.token_hex(6)}"


def stateless_branch(request: Request) -> str:
    via = request.top_via
    return STATELESS_PREFIX + _digest(
        via.branch, via.sent_by, request.call_id, request.cseq[0], request.method, request.uri_text
    )


@dataclass(slots=True)
class Locality:
    """Which addresses are ours, and what to write in Via and Record-Route."""

    hosts: set[str]
    ports: set[int]

    def is_us(self, uri: SipUri) -> bool:
        port = uri.port or (5061 if uri.scheme == "sips" or uri.transport == "tls" else 5060)
        return uri.host_bare in self.hosts and port in self.ports

    def via_is_us(self, via: Via) -> bool:
        host = via.host[1:-1] if via.host.startswith("[") else via.host
        port = via.port or DEFAULT_PORTS.get(via.transport.lower(), 5060)
        return host in self.hosts and port in self.ports

    def via_host_is_us(self, via: Via) -> bool:
        """Our address, whatever the port: a Via for a transport we have no listener for
        names a connection's own port or the transport's default (see local_for)."""
        return (via.host[1:-1] if via.host.startswith("[") else via.host) in self.hosts


def via_value(local: LocalAddress, branch: str, conn: int | None = None) -> str:
    value = f"SIP/2.0/{local.transport.upper()} {local.hostport()};branch={branch}"
    if conn is not None:
        value += f";cid={conn}"
    return value


def record_route_value(local: LocalAddress) -> str:
    transport = "" if local.transport == "udp" else f";transport={local.transport}"
    return f"<sip:{local.hostport()}{transport};lr>"


def stamp_received(request: Request, source: Peer) -> None:
    """§18.2.1 / RFC 3581: note where the request really came from in the sender's Via."""
    via = request.top_via
    host = via.host[1:-1] if via.host.startswith("[") else via.host
    changed = False
    if host != source.host:
        via.set_param("received", source.host)
        changed = True
    if via.param("rport") == "":
        via.set_param("rport", str(source.port))
        changed = True
    if changed:
        first = request.pop_first_value("via")
        if first is not None:
            request.prepend("Via", str(via))


def decrement_max_forwards(request: Request) -> int:
    """Returns the value before decrementing (70 when absent); never below zero."""
    text = request.get("max-forwards")
    value = int(text) if text and text.strip().isdigit() else MAX_FORWARDS_DEFAULT
    request.set("Max-Forwards", str(max(0, value - 1)))
    return value


def peer_for_uri(uri: SipUri) -> Peer:
    """Where to send a request whose next hop is ``uri`` (no DNS SRV/NAPTR: host and port)."""
    transport = uri.transport
    maddr = uri.param("maddr")
    host = maddr or uri.host_bare
    port = uri.port or (5061 if transport == "tls" else 5060)
    return Peer(transport, host, port)


def response_next_hop(response: Response, locality: Locality) -> tuple[Response, Peer] | None:
    """Pop our Via from a response to a statelessly forwarded request; where it goes next."""
    try:
        ours = response.top_via
    except SipParseError:
        return None
    branch = ours.branch or ""
    if not branch.startswith(STATELESS_PREFIX) or not locality.via_host_is_us(ours):
        return None
    cid = ours.param("cid")
    response.pop_first_value("via")
    try:
        nxt = response.top_via
    except SipParseError:
        return None
    host, port = nxt.response_address()
    transport = nxt.transport.lower()
    conn = int(cid) if cid and cid.isdigit() else None
    return response, Peer(transport, host, port, conn)


def pop_own_routes(request: Request, locality: Locality) -> None:
    """Remove the Route entries at the top that name this proxy (loose routing, §16.4)."""
    while True:
        routes = request.addresses("route")
        if not routes:
            return
        try:
            uri = parse_uri(routes[0].uri_text)
        except SipParseError:
            return
        if not isinstance(uri, SipUri) or not locality.is_us(uri):
            return
        request.pop_first_value("route")


def next_hop(request: Request) -> SipUri | None:
    """The top Route's URI, or the Request-URI; None if neither is a SIP URI."""
    routes: list[Address] = request.addresses("route")
    try:
        uri = parse_uri(routes[0].uri_text) if routes else request.uri
    except SipParseError:
        return None
    return uri if isinstance(uri, SipUri) else None
