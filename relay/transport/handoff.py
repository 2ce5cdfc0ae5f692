"""Stream hand-off between worker processes (issue #16): one connection, every core.

The kernel gives a TCP/TLS connection to one worker for its life, but a switch commonly sends
all its calls over one connection; a call belongs to the worker its Call-ID hashes to
(:func:`clearip.bpf.steering.worker_for`, the same owner the kernel picks for UDP). So the
worker holding an INBOUND connection (the *origin*) frames the stream and passes each message
whose owner is another worker to that owner; what the owner sends back to that peer comes back
to the origin, which writes it on the connection. Rules:

- Only inbound connections hand off. A worker's own outgoing connections (ClearIP, carriers)
  carry its own transactions, whatever their Call-IDs hash to. Keep-alive pings are answered
  by the origin; a message without a Call-ID is handled by the origin.
- The owner sees the message as if it came on a connection of its own whose ``Peer.conn`` is
  :func:`remote_conn` (origin, conn id): ``(origin + 1) << 32 | conn``. Local connection ids
  are below 2**32, so one int says which worker holds the connection; it survives a Via
  ``cid`` parameter (decimal digits) and comes back on the response.
- When the peer worker is down or its queue is full, the origin handles the message itself
  (counted ``handoff_fallback_local``): still answered, just not by the owner. When the
  origin's connection has gone, a write for it is dropped by the origin (counted
  ``handoff_write_no_connection``); once the origin has said so (CLOSED), the owner sends as
  for any lost connection (a response: a new connection to the peer, RFC 3261 §18.2.2).

Theory of operation: :class:`Handoff` is the endpoint's side: what to pass on
(:meth:`Handoff.forward`, :meth:`Handoff.write`, :meth:`Handoff.connection_closed`) and what a
received packet means. The packets are :mod:`handoff_packets`; the sockets they travel on,
one SOCK_SEQPACKET connection per ordered pair of workers, are :mod:`handoff_channel`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from clearip.relay.transport.handoff_channel import Channel
from clearip.relay.transport.handoff_packets import (
    HEADER_MAX,
    LOCAL_CONN_LIMIT,
    Kind,
    Packet,
    encode,
    owner_of,
    remote_conn,
    split_conn,
)
from clearip.relay.transport.peer import Peer

if TYPE_CHECKING:
    from clearip.relay.service.worker_role import WorkerRole
    from clearip.relay.transport.endpoint import SipEndpoint
    from clearip.relay.transport.stream import StreamConnection

log = logging.getLogger("clearip.transport.handoff")

CLOSED_REMEMBERED = 4096  # connections of other workers known to be gone


class Handoff:
    """The endpoint's side of the hand-off: what to pass on, and what passed packets mean."""

    def __init__(self, endpoint: SipEndpoint, role: WorkerRole) -> None:
        self.endpoint = endpoint
        self.index = role.index
        self.workers = role.count
        self.counters = endpoint.counters
        self.channel = Channel(role, self._received, self._bad, self._buffer_size)
        # Connections of other workers that told us they closed (remote_conn values).
        self._closed: dict[int, None] = {}

    def open(self) -> None:
        self.channel.open()

    def close(self) -> None:
        self.channel.close()

    def _buffer_size(self) -> int:
        return max(65536, self.endpoint.limits.max_message_size) + HEADER_MAX

    def _bad(self, reason: str) -> None:
        self.counters["handoff_bad_packet"] += 1
        log.warning("dropped a hand-off packet: %s", reason)

    # -- the origin (the worker holding the connection) ------------------------------------------
    def forward(self, data: bytes, conn: StreamConnection) -> bool:
        """Pass a message read on ``conn`` (inbound) to its owner; False: handle it here."""
        owner = owner_of(data, self.workers)
        if owner is None or owner == self.index or conn.id >= LOCAL_CONN_LIMIT:
            return False
        peer = conn.peer
        raw = encode(
            Packet(Kind.MESSAGE, self.index, conn.id, conn.name, peer.host, peer.port, data)
        )
        if not self.channel.send(owner, raw):
            self.counters["handoff_fallback_local"] += 1
            return False
        self.counters["handoff_sent"] += 1
        conn.handed_to.add(owner)
        return True

    def connection_closed(self, conn: StreamConnection) -> None:
        """Tell the workers that handled messages of ``conn`` that it has gone."""
        peer = conn.peer
        raw = encode(Packet(Kind.CLOSED, self.index, conn.id, conn.name, peer.host, peer.port))
        for worker in conn.handed_to:
            self.channel.send(worker, raw)

    # -- the owner ---------------------------------------------------------------------------
    def write(self, peer: Peer, data: bytes) -> bool:
        """Send ``data`` on another worker's connection ``peer.conn``; False when that cannot
        be (a local id, a connection known to be gone, its worker down): send as without it."""
        where = split_conn(peer.conn) if peer.conn is not None else None
        if where is None or where[0] == self.index or peer.conn in self._closed:
            return False
        worker, conn = where
        if worker >= self.workers:
            return False
        try:
            raw = encode(
                Packet(Kind.WRITE, worker, conn, peer.transport, peer.host, peer.port, data)
            )
        except ValueError:  # a cid echoed back altered, on a Via naming another transport
            return False
        if not self.channel.send(worker, raw):
            self.counters["handoff_write_failed"] += 1
            return False
        self.counters["handoff_write_sent"] += 1
        return True

    # -- receiving ---------------------------------------------------------------------------
    def _received(self, packet: Packet) -> None:
        endpoint = self.endpoint
        if packet.kind is Kind.MESSAGE:
            conn = remote_conn(packet.worker, packet.conn)
            if self._closed and conn in self._closed:
                del self._closed[conn]  # an id reused (a restarted worker's random base)
            self.counters["handoff_received"] += 1
            peer = Peer(packet.transport, packet.host, packet.port, conn)
            endpoint.message_received(packet.data, peer, datagram=False)
        elif packet.kind is Kind.WRITE:
            self.counters["handoff_write_received"] += 1
            local = endpoint.connections.get(packet.conn)
            if packet.worker != self.index or local is None or local.closed:
                self.counters["handoff_write_no_connection"] += 1
                return
            local.write(packet.data)
        else:
            conn = remote_conn(packet.worker, packet.conn)
            self.counters["handoff_closed_received"] += 1
            self._closed[conn] = None
            if len(self._closed) > CLOSED_REMEMBERED:
                del self._closed[next(iter(self._closed))]
            if endpoint.on_connection_lost is not None:
                endpoint.on_connection_lost(Peer(packet.transport, packet.host, packet.port, conn))
