"""The SIP endpoint: UDP, TCP and TLS listeners and outbound connections, on asyncio.

A thin shell around the sans-IO stack: it reads bytes, frames and parses them, and hands each
message to one handler with the :class:`Peer` it came from; it writes what it is told to send.
It also enforces what must be enforced before any parsing:

- the source check (``is_trusted``) on every UDP datagram and every accepted connection:
  untrusted datagrams are dropped silently, untrusted connections closed; both counted;
- limits: message size, connections in total and per source, a deadline for a started message;
- malformed input: a request that can be answered gets 400 naming the problem, the rest is
  dropped; a stream whose framing breaks is closed. Every outcome increments a counter;
- sending never waits: a send that fails (no socket, no connection, a name that does not
  resolve) is counted and reported to ``on_send_error``. A response whose connection has
  gone is sent on a new connection to the same address (RFC 3261 §18.2.2).

UDP is read with ``recvmsg`` in batches so the IP TOS / IPv6 traffic class is visible: datagrams
the kernel filter marked DSCP EF (emergency INVITEs) are handled first within each batch.
Outbound stream connections are reused per peer (RFC 5923 style) and idle ones are closed.

As one of several worker processes (a :class:`WorkerRole`, issue #16) every listener is bound
with SO_REUSEPORT; each UDP listener joins the Call-ID steering program and gets a second
"emergency" socket on the same address, drained before every batch of the normal one and after
every few datagrams of it; and a message read on an inbound stream connection goes to the
worker owning its Call-ID (:mod:`handoff`). Without a role none of this costs anything per message.

Where the parts live: this module opens and closes listeners, parses what streams and
hand-offs deliver, and sends; :mod:`udp` reads datagrams (compiled), :mod:`listeners` binds
UDP sockets and joins steering, :mod:`stream` is one TCP/TLS connection,
:mod:`connections` the table of them (a base class of :class:`SipEndpoint`, as is
:mod:`addresses`: our address for Via and Record-Route), :mod:`handoff` the worker group.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING

from clearip.relay.sip.badrequest import build_bad_request
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.parser import DEFAULT_LIMITS, Limits, parse_message
from clearip.relay.transport.addresses import LocalAddresses, is_ip
from clearip.relay.transport.connections import CONNECT_TIMEOUT, StreamConnections
from clearip.relay.transport.handoff import Handoff
from clearip.relay.transport.handoff_packets import LOCAL_CONN_LIMIT
from clearip.relay.transport.listeners import bind_udp, join_steering
from clearip.relay.transport.peer import STREAM_TRANSPORTS, ListenerSpec, LocalAddress, Peer
from clearip.relay.transport.stream import StreamConnection
from clearip.relay.transport.tls import ClientTls
from clearip.relay.transport.udp import UdpSocket

if TYPE_CHECKING:  # worker_role imports this package
    from clearip.relay.service.worker_role import WorkerRole

log = logging.getLogger("clearip.transport")

__all__ = ["SipEndpoint"]

Handler = Callable[[Request | Response, Peer], None]
# A tracer sees every parsed message in ("in") and every message out ("out"), with the peer.
Tracer = Callable[[str, Message, Peer], None]
SendErrorHandler = Callable[[Message, Peer, str], None]


class SipEndpoint(StreamConnections, LocalAddresses):
    """Listeners plus outbound connections; see the module docstring."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits = DEFAULT_LIMITS,
        tls_server: ssl.SSLContext | None = None,
        tls_client: ClientTls | ssl.SSLContext | None = None,
        counters: Counter[str] | None = None,
        is_trusted: Callable[[str], bool] | None = None,
        on_send_error: SendErrorHandler | None = None,
        on_connection_lost: Callable[[Peer], None] | None = None,
        max_connections: int = 4096,
        max_connections_per_source: int = 64,
        message_deadline: float = 10.0,
        idle_timeout: float = 600.0,
        worker: WorkerRole | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.tls_server = tls_server
        # Which context each outgoing TLS connection verifies with (a bare context: for all).
        if isinstance(tls_client, ssl.SSLContext):
            tls_client = ClientTls(peers_context=tls_client)
        self.tls_client = tls_client if tls_client is not None else ClientTls()
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.is_trusted = is_trusted
        self.on_send_error = on_send_error
        self.on_connection_lost = on_connection_lost
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        # Bytes queued for a stream peer that does not read before the connection is given up.
        self.max_write_buffer = 1024 * 1024
        self.message_deadline = message_deadline
        self.idle_timeout = idle_timeout
        # A worker's ids start at random: another worker may still hold the id of a connection
        # of this worker's previous life (a Via cid, handoff.remote_conn), so no reuse.
        self.worker = worker
        first_id = 1 if worker is None else 1 + secrets.randbelow(1 << 30)
        self.conn_ids = itertools.count(first_id)
        self._handoff: Handoff | None = None
        self._init_connections()
        self.udp_sockets: list[UdpSocket] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._init_addresses()
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        # Tracing costs one attribute check per message when nobody traces.
        self.tracer: Tracer | None = None
        # How long the oldest datagram of the latest UDP batch waited in the kernel's queue:
        # the proxy's backlog, which the core uses to shed new INVITEs under overload.
        self.queue_delay = 0.0

    def set_limits(
        self, *, max_message_size: int, max_connections: int, max_connections_per_source: int
    ) -> None:
        """New limits (reload): datagrams and connections accepted from now on use them;
        connections already open keep the message size they were framed with."""
        self.limits = dataclasses.replace(self.limits, max_message_size=max_message_size)
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source

    # -- listeners ----------------------------------------------------------------------------
    async def listen(self, spec: ListenerSpec) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport = spec.transport.lower()
        family = socket.AF_INET6 if ":" in spec.address else socket.AF_INET
        worker = self.worker
        if transport == "udp":
            sock = bind_udp(family, spec.address, spec.port, reuse_port=worker is not None)
            bound = sock.getsockname()[:2]
            local = LocalAddress("udp", spec.advertise or bound[0], bound[1])
            udp = UdpSocket(self, sock, local)
            pin_dir = worker.steering_dir(spec) if worker is not None else ""
            if worker is not None and pin_dir:
                try:
                    udp.emergency = join_steering(udp, worker, pin_dir)
                except BaseException:
                    sock.close()
                    raise
                loop.add_reader(udp.emergency.sock, udp.emergency.on_emergency_readable)
            loop.add_reader(sock, udp.on_readable)
            self.udp_sockets.append(udp)
        elif transport in STREAM_TRANSPORTS:
            if worker is not None and worker.count > 1 and self._handoff is None:
                handoff = Handoff(self, worker)
                handoff.open()
                self._handoff = handoff
            context = None
            if transport == "tls":
                context = self.tls_server
                if spec.certificate and spec.private_key:
                    from clearip.relay.transport.tls import server_context

                    context = server_context(spec.certificate, spec.private_key)
                if context is None:
                    raise ValueError("a TLS listener needs a certificate and a private key")
            server = await loop.create_server(
                lambda: StreamConnection(self, transport, inbound=True),
                host=spec.address,
                port=spec.port,
                family=family,
                ssl=context,
                reuse_address=True,
                reuse_port=True if worker is not None else None,
                backlog=1024,
            )
            self._servers.append(server)
            bound = server.sockets[0].getsockname()[:2]
            local = LocalAddress(transport, spec.advertise or bound[0], bound[1])
        else:
            raise ValueError(f"unknown transport {spec.transport!r}")
        self.locals.append(local)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_idle())
        return bound[0], bound[1]

    # -- receiving ----------------------------------------------------------------------------
    def message_received(self, data: bytes, peer: Peer, *, datagram: bool) -> None:
        """A framed message from a stream (or a hand-off): parse, trace, hand over. Datagrams
        take the same steps, compiled, in :meth:`UdpSocket.receive`."""
        try:
            message = parse_message(data, limits=self.limits, datagram=datagram)
        except SipParseError as exc:
            self.parse_failed(data, peer, exc)
            return
        if self.tracer is not None:
            self.tracer("in", message, peer)
        try:
            self.handler(message, peer)
        except SipParseError as exc:
            self.handler_failed(data, message, peer, exc)

    def parse_failed(self, data: bytes, peer: Peer, exc: SipParseError) -> None:
        """A message that does not parse: 400 naming the problem when it can be answered."""
        self.counters[f"parse_error_{exc.kind}"] += 1
        answer = build_bad_request(data, exc.reason)
        if answer is None:
            self.counters["malformed_dropped"] += 1
            log.debug("dropped malformed message from %s: %s", peer, exc.reason)
            return
        self.counters["bad_request_sent"] += 1
        self.send_bytes(answer, peer)

    def handler_failed(
        self, data: bytes, message: Request | Response, peer: Peer, exc: SipParseError
    ) -> None:
        """A lazily parsed header turned out malformed deep in the handler."""
        self.counters[f"parse_error_{exc.kind}"] += 1
        if isinstance(message, Request) and message.method != "ACK":
            answer = build_bad_request(data, exc.reason)
            if answer is not None:
                self.send_bytes(answer, peer)

    # -- sending ------------------------------------------------------------------------------
    def send(self, message: Message, peer: Peer) -> None:
        """Send without waiting; failures go to ``on_send_error`` and the counters."""
        if self.tracer is not None:
            self.tracer("out", message, peer)
        data = message.to_bytes()
        if peer.transport == "udp":
            if not is_ip(peer.host):
                self._spawn(self._resolve_and_send(message, data, peer))
                return
            if not self._sendto(data, peer):
                self.send_failed(message, peer, "UDP send failed")
            return
        conn = self.connections.get(peer.conn) if peer.conn is not None else None
        if conn is None or conn.closed:
            # Another worker's connection (a message it handed over): it writes for us.
            if (
                self._handoff is not None
                and peer.conn is not None
                and peer.conn >= LOCAL_CONN_LIMIT
                and self._handoff.write(peer, data)
            ):
                return
            conn = self._by_address.get((peer.transport, peer.host, peer.port))
        if conn is not None and conn.write(data):
            return
        # No usable connection (for a response: the request's connection has gone, so open a
        # new one to the same address, RFC 3261 §18.2.2).
        self._spawn(self._connect_and_send(message, data, peer))

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send_bytes(self, data: bytes, peer: Peer) -> None:
        if peer.transport == "udp":
            self._sendto(data, peer)
            return
        conn = self.connections.get(peer.conn) if peer.conn is not None else None
        if conn is not None:
            conn.write(data)
        elif self._handoff is not None and peer.conn is not None:
            self._handoff.write(peer, data)

    def _sendto(self, data: bytes, peer: Peer) -> bool:
        want_v6 = ":" in peer.host
        for udp in self.udp_sockets:
            if (udp.family == socket.AF_INET6) == want_v6:
                try:
                    udp.sendto(data, peer.host, peer.port)
                except OSError as exc:
                    self.counters["udp_send_error"] += 1
                    log.debug("UDP send to %s failed: %s", peer, exc)
                    return False
                return True
        self.counters["udp_no_socket"] += 1
        return False

    async def _resolve_and_send(self, message: Message, data: bytes, peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(peer.host, peer.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            self.send_failed(message, peer, f"cannot resolve {peer.host}: {exc}")
            return
        host = str(infos[0][4][0])
        if not self._sendto(data, Peer("udp", host, peer.port)):
            self.send_failed(message, peer, "UDP send failed")

    async def _connect_and_send(self, message: Message, data: bytes, peer: Peer) -> None:
        try:
            conn = await self._connection_to(peer.without_conn(), None, None, CONNECT_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self.send_failed(message, peer, f"cannot connect to {peer}: {exc}")
            return
        if not conn.write(data):
            self.send_failed(message, peer, f"connection to {peer} closed")

    def send_failed(self, message: Message, peer: Peer, reason: str) -> None:
        self.counters["send_failed"] += 1
        log.info("%s", reason)
        if self.on_send_error is not None:
            self.on_send_error(message, peer, reason)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        for udp in self.udp_sockets:
            loop.remove_reader(udp.sock)
            udp.sock.close()
            if udp.emergency is not None:
                loop.remove_reader(udp.emergency.sock)
                udp.emergency.sock.close()
        self.udp_sockets.clear()
        for server in self._servers:
            server.close()
        for conn in list(self.connections.values()):
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if self._handoff is not None:
            await asyncio.sleep(0)  # the connections' losses first: they tell the owners
            self._handoff.close()
            self._handoff = None
