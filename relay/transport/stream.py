"""One TCP or TLS connection of the endpoint, inbound or outbound: bytes in, framed messages out.

Rules of this module:

- It frames (:class:`StreamFramer`), answers keep-alive pings (RFC 5626: a CRLFCRLF gets a
  CRLF) and hands each framed message on; it never parses. The endpoint parses, traces and
  delivers (:meth:`SipEndpoint.message_received`), and owns the table of connections
  (accepting, registering, forgetting: :mod:`connections`).
- A stream whose framing breaks is closed (counted ``stream_closed_<kind>``); a message
  started but not complete within the endpoint's ``message_deadline`` closes it too
  (``stream_closed_incomplete``).
- A write to a peer that stopped reading (more than ``max_write_buffer`` bytes queued) gives
  the connection up (``stream_write_stalled``) rather than queue without bound.
- On an inbound connection of a worker group, each framed message first goes to the
  hand-off (:mod:`handoff`): the worker owning its Call-ID gets it; what the hand-off
  declines is handled here.

Theory of operation: asyncio calls :meth:`StreamConnection.connection_made`,
``data_received`` and ``connection_lost``; ``last_activity`` (either direction) drives the
endpoint's idle sweep, ``last_received`` is the ClearIP link's proof of life.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.framing import PING_BYTES, PONG, Ping, StreamFramer
from clearip.relay.transport.peer import Peer

if TYPE_CHECKING:  # the endpoint imports this module
    from clearip.relay.transport.endpoint import SipEndpoint

log = logging.getLogger("clearip.transport")

__all__ = ["StreamConnection"]


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, inbound or outbound."""

    def __init__(self, endpoint: SipEndpoint, transport_name: str, inbound: bool) -> None:
        self.endpoint = endpoint
        self.name = transport_name
        self.inbound = inbound
        self.id = next(endpoint.conn_ids)
        self.framer = StreamFramer(endpoint.limits)
        self.transport: asyncio.Transport | None = None
        self.peer = Peer(transport_name, "", 0, self.id)
        self.last_activity = time.monotonic()
        # When the peer last sent anything (a pong, a message): the ClearIP link's proof of life.
        self.last_received = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        self.closed = False
        self.sockname: tuple[str, int] | None = None  # our end: (address, port)
        # Workers: messages of an inbound connection go to their call's owner (handoff.py).
        self.handoff = endpoint._handoff if inbound else None
        self.handed_to: set[int] = set()  # the workers that got some

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave like them.
        self.transport = cast(asyncio.Transport, transport)
        remote = transport.get_extra_info("peername") or ("", 0)
        self.peer = Peer(self.name, remote[0], remote[1], self.id)
        local = transport.get_extra_info("sockname")
        if local:
            self.sockname = (str(local[0]), int(local[1]))
        if self.inbound and not self.endpoint.accept_connection(self):
            self.transport.abort()
            self.closed = True
            return
        self.endpoint.register(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.last_received = time.monotonic()
        endpoint = self.endpoint
        try:
            items = self.framer.feed(data)
        except SipParseError as exc:
            endpoint.counters[f"stream_closed_{exc.kind}"] += 1
            log.info("closing %s: %s", self.peer, exc.reason)
            self.close()
            return
        handoff = self.handoff
        for item in items:
            if isinstance(item, bytes):
                if handoff is None or not handoff.forward(item, self):
                    endpoint.message_received(item, self.peer, datagram=False)
            elif isinstance(item, Ping):
                self.write(PONG)
            # A Pong needs nothing more: last_received above is the proof of life.
        self._arm_deadline()

    def ping(self) -> bool:
        """Send an RFC 5626 keep-alive ping; the peer's next CRLF is read as its pong."""
        self.framer.expect_pong()
        return self.write(PING_BYTES)

    def _arm_deadline(self) -> None:
        if self.framer.pending and self.deadline is None:
            loop = asyncio.get_running_loop()
            self.deadline = loop.call_later(self.endpoint.message_deadline, self._deadline_passed)
        elif not self.framer.pending and self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _deadline_passed(self) -> None:
        self.deadline = None
        if self.framer.pending:
            self.endpoint.counters["stream_closed_incomplete"] += 1
            log.info("closing %s: no complete message within the deadline", self.peer)
            self.close()

    def write(self, data: bytes) -> bool:
        if self.transport is None or self.closed or self.transport.is_closing():
            return False
        self.last_activity = time.monotonic()
        if self.transport.get_write_buffer_size() > self.endpoint.max_write_buffer:
            # The peer stopped reading (TCP window closed): rather than queue without bound,
            # give the connection up; its transactions fail (ClearIP: fail-open) and a new
            # connection is opened for what comes next.
            self.endpoint.counters["stream_write_stalled"] += 1
            log.warning("%s stopped reading (%d bytes queued): closing", self.peer,
                        self.transport.get_write_buffer_size())  # fmt: skip
            self.close()
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.deadline is not None:
            self.deadline.cancel()
        self.endpoint.unregister(self)
