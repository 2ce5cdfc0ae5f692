"""The endpoint's TCP/TLS connections: who may connect, the table of them, opening our own.

Rules of this module:

- An accepted connection is checked before anything is read from it: the source check
  (``is_trusted``: ``untrusted_connection_closed``), the limit on inbound connections in
  total (``connection_limit_closed``) and per source host
  (``connection_per_source_limit_closed``). The limits bound what peers open; the
  connections we open ourselves are free.
- Every open connection is in ``connections`` by id (what ``Peer.conn`` names) and, first
  come, by (transport, host, port): outbound messages reuse a connection to the same address
  (RFC 5923 style) and :meth:`StreamConnections.connect` opens one at most once at a time
  per address.
- A failed TLS handshake is counted every time (``tls_handshake_failed``) and logged once per
  peer and reason until that peer next succeeds (:class:`FailureLog`).
- Inbound connections with no traffic for ``idle_timeout`` are closed (``stream_closed_idle``)
  by a sweep every ``min(30 s, idle_timeout / 2)``.
- When a connection goes, the workers it handed messages to are told (:mod:`handoff`), then
  ``on_connection_lost``.

Theory of operation: :class:`StreamConnections` is a part of :class:`SipEndpoint` (a base
class); :class:`StreamConnection` (:mod:`stream`) calls :meth:`accept_connection`,
:meth:`register` and :meth:`unregister` as asyncio reports its life.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from clearip.relay.transport.peer import Peer
from clearip.relay.transport.stream import StreamConnection
from clearip.relay.transport.tls import ClientTls, FailureLog, failure_reason

if TYPE_CHECKING:  # the endpoint imports this module
    from clearip.relay.transport.endpoint import SipEndpoint
    from clearip.relay.transport.handoff import Handoff

log = logging.getLogger("clearip.transport")

__all__ = ["CONNECT_TIMEOUT", "StreamConnections"]

CONNECT_TIMEOUT = 5.0  # seconds for a connection (and a TLS handshake) to a peer


class StreamConnections:
    """The endpoint's stream connections; see the module docstring."""

    # What this part reads of the endpoint (its settings, set by SipEndpoint.__init__).
    counters: Counter[str]
    is_trusted: Callable[[str], bool] | None
    on_connection_lost: Callable[[Peer], None] | None
    max_connections: int
    max_connections_per_source: int
    idle_timeout: float
    tls_client: ClientTls
    _handoff: Handoff | None

    def _init_connections(self) -> None:
        self.connections: dict[int, StreamConnection] = {}
        self._by_address: dict[tuple[str, str, int], StreamConnection] = {}
        self._per_source: Counter[str] = Counter()
        self._inbound = 0  # inbound connections (what max_connections bounds)
        self._connecting: dict[tuple[str, str, int], asyncio.Task[StreamConnection]] = {}
        self._tls_failures = FailureLog()

    def accept_connection(self, conn: StreamConnection) -> bool:
        host = conn.peer.host
        if self.is_trusted is not None and not self.is_trusted(host):
            self.counters["untrusted_connection_closed"] += 1
            return False
        if self._inbound >= self.max_connections:
            self.counters["connection_limit_closed"] += 1
            log.warning("connection limit %d reached: refusing %s", self.max_connections, conn.peer)
            return False
        if self._per_source[host] >= self.max_connections_per_source:
            self.counters["connection_per_source_limit_closed"] += 1
            return False
        return True

    def register(self, conn: StreamConnection) -> None:
        self.connections[conn.id] = conn
        if conn.inbound:  # the limits are on what peers open; our own connections are free
            self._inbound += 1
            self._per_source[conn.peer.host] += 1
        self._by_address.setdefault((conn.name, conn.peer.host, conn.peer.port), conn)

    def unregister(self, conn: StreamConnection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        if conn.inbound:
            self._inbound -= 1
            self._per_source[conn.peer.host] -= 1
            if self._per_source[conn.peer.host] <= 0:
                del self._per_source[conn.peer.host]
        key = (conn.name, conn.peer.host, conn.peer.port)
        if self._by_address.get(key) is conn:
            del self._by_address[key]
        if conn.handed_to and self._handoff is not None:
            self._handoff.connection_closed(conn)
        if self.on_connection_lost is not None:
            self.on_connection_lost(conn.peer)

    async def connect(
        self,
        peer: Peer,
        *,
        server_name: str | None = None,
        context: ssl.SSLContext | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ) -> Peer:
        """Open (or reuse) a stream connection to ``peer``; returns the peer with its conn id.

        For TLS, ``server_name`` (default: the peer's host) is sent as SNI and checked against
        the certificate; ``context`` (default: the carriers' policy) says whom to trust.
        """
        conn = await self._connection_to(peer, server_name, context, timeout)
        return conn.peer

    async def _connection_to(
        self, peer: Peer, server_name: str | None, context: ssl.SSLContext | None, timeout: float
    ) -> StreamConnection:
        """The open connection to ``peer``'s address, or the one being opened, or a new one."""
        key = (peer.transport, peer.host, peer.port)
        existing = self._by_address.get(key)
        if existing is not None and not existing.closed:
            return existing
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.ensure_future(self._open(peer, server_name, context, timeout))
            self._connecting[key] = task
            task.add_done_callback(lambda _t: self._connecting.pop(key, None))
        return await asyncio.shield(task)

    async def _open(
        self, peer: Peer, server_name: str | None, context: ssl.SSLContext | None, timeout: float
    ) -> StreamConnection:
        loop = asyncio.get_running_loop()
        name = None
        if peer.transport == "tls":
            name = server_name or peer.host
            if context is None:
                context = self.tls_client(peer, name)
        else:
            context = None
        endpoint = cast("SipEndpoint", self)  # this class is one of its bases
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(endpoint, peer.transport, inbound=False),
                    host=peer.host,
                    port=peer.port,
                    ssl=context,
                    server_hostname=name,
                ),
                timeout,
            )
        except ssl.SSLError as exc:
            self._tls_failed(peer, name, exc)
            raise
        if context is not None:
            self._tls_failures.succeeded(peer)
        self._by_address[(peer.transport, peer.host, peer.port)] = conn
        return conn

    def _tls_failed(self, peer: Peer, server_name: str | None, exc: ssl.SSLError) -> None:
        """Counted every time; logged once per peer and reason until the peer next succeeds."""
        self.counters["tls_handshake_failed"] += 1
        reason = failure_reason(exc)
        if self._tls_failures.first(peer, reason):
            log.warning(
                "TLS handshake with %s (server name %s) failed: %s",
                peer.without_conn(),
                server_name,
                reason,
            )

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.idle_timeout / 2))
            cutoff = time.monotonic() - self.idle_timeout
            for conn in list(self.connections.values()):
                if conn.inbound and conn.last_activity < cutoff:
                    self.counters["stream_closed_idle"] += 1
                    conn.close()
