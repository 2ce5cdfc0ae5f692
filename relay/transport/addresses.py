"""Which of our addresses a message names: Via sent-by, Record-Route, and traces' "our end".

Rules of this module:

- The transport named is always the one the message goes on (RFC 3261 §18.1.1). With a
  listener for it, our address is that listener's (a peer can open a new connection to it);
  without one, a connection's own address when the message goes on a known connection, else
  our address with the transport's default port (5060, 5061 for TLS).
- A listener bound to a wildcard (0.0.0.0, ::) is named by the address the kernel would send
  from towards the peer (asked once per peer host with a connected UDP probe, then cached).
- It is asked for every message sent, so answers found from the listeners are cached per
  (transport, peer host, record-route, number of listeners); a connection's own address is
  not cached. Both caches are emptied when they pass 4096 entries.

Theory of operation: :class:`LocalAddresses` is a part of :class:`SipEndpoint` (a base
class): it reads the endpoint's listeners (``locals``, ``udp_sockets``) and connections and
keeps its two caches.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import TYPE_CHECKING

from clearip.relay.transport.peer import LocalAddress, Peer

if TYPE_CHECKING:
    from clearip.relay.transport.stream import StreamConnection
    from clearip.relay.transport.udp import UdpSocket

__all__ = ["LocalAddresses", "is_ip"]


@functools.lru_cache(maxsize=4096)
def is_ip(host: str) -> bool:
    """True for a literal IPv4/IPv6 address (cached: it is asked for every UDP send)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class LocalAddresses:
    """Our address for a message's Via/Record-Route and for traces; see the module docstring."""

    # The endpoint's listeners and connections, which this part reads.
    locals: list[LocalAddress]
    udp_sockets: list[UdpSocket]
    connections: dict[int, StreamConnection]
    _by_address: dict[tuple[str, str, int], StreamConnection]

    def _init_addresses(self) -> None:
        self.locals = []
        self._route_cache: dict[str, str] = {}
        self._local_cache: dict[tuple[str, str | None, bool, int], LocalAddress] = {}

    def local_for(
        self,
        transport: str,
        remote_host: str | None = None,
        conn: int | None = None,
        *,
        record_route: bool = False,
    ) -> LocalAddress:
        """Our address for Via/Record-Route on ``transport`` towards ``remote_host``.

        The transport is always the one the message goes on (RFC 3261 §18.1.1). With a
        listener for it, the sent-by is that listener (a peer can open a new connection to it).
        Without one (ClearIP over TLS with no TLS listener, the packaged default), the sent-by
        is the connection's own address when the message goes on a known connection (where
        responses come back), else our address with the transport's default port.
        ``record_route``: an address a peer can send new requests to, so always a listener
        (the UDP one when there is none for ``transport``).
        """
        key = (transport, remote_host, record_route, len(self.locals))
        cached = self._local_cache.get(key)
        if cached is not None:
            return cached
        transport = transport.lower()
        want_v6 = remote_host is not None and ":" in remote_host
        candidates = [a for a in self.locals if a.transport == transport]
        if not candidates and record_route:
            candidates = [a for a in self.locals if a.transport == "udp"] or self.locals
        listening = bool(candidates)
        if not candidates:
            connection = self.connections.get(conn) if conn is not None else None
            if connection is not None and connection.sockname is not None:
                return LocalAddress(transport, *connection.sockname)
            others = [a for a in self.locals if a.transport == "udp"] or self.locals
            default_port = 5061 if transport == "tls" else 5060
            candidates = [LocalAddress(transport, a.host, default_port) for a in others] or [
                LocalAddress(transport, "127.0.0.1", default_port)
            ]
        chosen = next((a for a in candidates if (":" in a.host) == want_v6), candidates[0])
        if chosen.host in ("0.0.0.0", "::") and remote_host is not None:
            host = self._source_address_for(remote_host)
            chosen = LocalAddress(chosen.transport, host, chosen.port)
        # Asked for every message sent: remembered per peer address when a listener answered
        # (it cannot change while the listeners do not, and a new listener changes the key);
        # a connection's own address is not remembered.
        if listening:
            if len(self._local_cache) > 4096:
                self._local_cache.clear()
            self._local_cache[key] = chosen
        return chosen

    def local_address(self, peer: Peer) -> tuple[str, int]:
        """Our end of the path to or from ``peer`` as a capture on this host would show it
        (traces, HEP): a connection's own address for TCP/TLS; for UDP the address the socket
        the relay uses for the peer's family is bound to (a wildcard resolved by the route)."""
        if peer.transport == "udp":
            want_v6 = ":" in peer.host
            for udp in self.udp_sockets:
                if (udp.family == socket.AF_INET6) == want_v6:
                    host, port = udp.bound
                    if host in ("0.0.0.0", "::") and is_ip(peer.host):
                        host = self._source_address_for(peer.host)
                    return host, port
        else:
            conn = self.connections.get(peer.conn) if peer.conn is not None else None
            if conn is None:
                conn = self._by_address.get((peer.transport, peer.host, peer.port))
            if conn is not None and conn.sockname is not None:
                return conn.sockname
        address = self.local_for(peer.transport, peer.host, peer.conn)
        return address.host, address.port

    def _source_address_for(self, remote_host: str) -> str:
        """The address the kernel would send from towards ``remote_host`` (cached)."""
        cached = self._route_cache.get(remote_host)
        if cached is not None:
            return cached
        family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((remote_host, 9))
                address = str(probe.getsockname()[0])
        except OSError:
            address = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        if len(self._route_cache) > 4096:
            self._route_cache.clear()
        self._route_cache[remote_host] = address
        return address
