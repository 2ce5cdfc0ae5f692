"""Via, Record-Route and loose routing without per-dialog state (RFC 3261 §16.4-§16.7, §16.12).

Rules this module keeps:

- Every request we forward gets our Via on top. Stateful branches (INVITE towards ClearIP and
  the destinations) carry a loop-detection hash (§16.6 step 8) and are unique (§8.1.1.7): a
  random prefix drawn when the process starts (and again in a forked child) and a counter, so
  no system call per branch, and nothing an outsider can guess without seeing our traffic;
  stateless branches (in-dialog requests) are a hash of the incoming request, so a
  retransmission gets the same branch and the next hop absorbs it.
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
import os
import secrets
from dataclasses import dataclass
from typing import Final, final

from clearip.relay.sip.address import Address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.peer import LocalAddress, Peer
from clearip.relay.sip.uri import SipUri, parse_uri
from clearip.relay.sip.via import DEFAULT_PORTS, MAGIC_COOKIE, Via

STATEFUL_PREFIX = MAGIC_COOKIE + "cip"
STATELESS_PREFIX = MAGIC_COOKIE + "cis"
MAX_FORWARDS_DEFAULT = 70
_PEER_CACHE_LIMIT: Final = 4096


def _digest(text: str, size: int) -> str:
    data = text.encode("utf-8", "surrogateescape")
    return hashlib.blake2s(data, digest_size=size).hexdigest()


def loop_hash(request: Request) -> str:
    """Identifies the request as this proxy last saw it (§16.6 step 8, §16.3 step 4); the
    same in every process (a loop may come back to another worker)."""
    text = f"{request.uri_text}|{request.from_tag}|{request.call_id}|{request.cseq[0]}"
    return _digest(text, 5)


@final
class _Serial:
    """The unique part of stateful branches: a random prefix and a counter."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"


_SERIAL: Final = _Serial()
# A forked worker must not repeat its parent's branches.
os.register_at_fork(after_in_child=_SERIAL.reseed)


def stateful_branch(request: Request, loop: str | None = None) -> str:
    """A new branch for a request we send statefully; ``loop`` is its :func:`loop_hash` when
    the caller has it already."""
    return f"{STATEFUL_PREFIX}{loop_hash(request) if loop is None else loop}.{_SERIAL.next()}"


def stateless_branch(request: Request) -> str:
    via = request.top_via
    text = (
        f"{via.branch}|{via.sent_by}|{request.call_id}|{request.cseq[0]}|{request.method}"
        f"|{request.uri_text}"
    )
    return STATELESS_PREFIX + _digest(text, 8)


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
    value = f"{_local_texts(local)[0]}{branch}"
    if conn is not None:
        value += f";cid={conn}"
    return value


def record_route_value(local: LocalAddress) -> str:
    return _local_texts(local)[1]


def _local_texts(local: LocalAddress) -> tuple[str, str]:
    """What a listener writes in Via (up to the branch) and Record-Route, made once per
    address (LocalAddress's methods run interpreted)."""
    key = (local.transport, local.host, local.port)
    texts = _LOCAL_TEXTS.get(key)
    if texts is None:
        transport = "" if local.transport == "udp" else f";transport={local.transport}"
        texts = (
            f"SIP/2.0/{local.transport.upper()} {local.hostport()};branch=",
            f"<sip:{local.hostport()}{transport};lr>",
        )
        if len(_LOCAL_TEXTS) >= _PEER_CACHE_LIMIT:
            _LOCAL_TEXTS.clear()
        _LOCAL_TEXTS[key] = texts
    return texts


_LOCAL_TEXTS: Final[dict[tuple[str, str, int], tuple[str, str]]] = {}


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
    """Where to send a request whose next hop is ``uri`` (no DNS SRV/NAPTR: host and port).

    Peers are immutable: the few next hops a proxy has are made once and shared."""
    transport = uri.transport
    maddr = uri.param("maddr")
    host = maddr or uri.host_bare
    port = uri.port or (5061 if transport == "tls" else 5060)
    return _peer(transport, host, port)


def _peer(transport: str, host: str, port: int) -> Peer:
    """``Peer(transport, host, port)``, made once: a proxy has few next hops, and a Peer is
    immutable, so they are shared (bounded: the table starts again when full)."""
    key = (transport, host, port)
    peer = _PEERS.get(key)
    if peer is None:
        if len(_PEERS) >= _PEER_CACHE_LIMIT:
            _PEERS.clear()
        peer = _PEERS[key] = Peer(transport, host, port)
    return peer


_PEERS: Final[dict[tuple[str, str, int], Peer]] = {}


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
    conn = int(cid) if cid and cid.isdigit() else None
    return response, via_return_peer(nxt, conn)


def via_return_peer(via: Via, conn: int | None = None) -> Peer:
    """Where a response goes back to, for the Via now at its top (§18.2.2: received, rport,
    the sent-by port); ``conn``: the connection the request came in on, when we know it."""
    host, port = via.response_address()
    transport = via.transport.lower()
    if conn is not None:
        return Peer(transport, host, port, conn)
    return _peer(transport, host, port)


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
