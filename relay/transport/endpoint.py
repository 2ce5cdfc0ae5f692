"""The SIP endpoint: UDP, TCP and TLS listeners and outbound connections, on asyncio.

A thin shell around the sans-IO stack: it reads bytes, frames and parses them, and hands each
message to one handler with the :class:`Peer` it came from; it writes what it is told to send.
It also enforces what must be enforced before any parsing:

- the source check (``is_trusted``) on every UDP datagram and every accepted connection:
  untrusted datagrams are dropped silently, untrusted connections closed; both counted;
- limits: message size, connections in total and per source, a deadline for a started message;
- malformed input: a request that can be answered gets 400 naming the problem, the rest is
  dropped; a stream whose framing breaks is closed. Every outcome increments a counter.

UDP is read with ``recvmsg`` in batches so the IP TOS / IPv6 traffic class is visible: datagrams
the kernel filter marked DSCP EF (emergency INVITEs) are handled first within each batch.
Outbound stream connections are reused per peer (RFC 5923 style) and idle ones are closed.

As one of several worker processes (a :class:`WorkerRole`, issue #16) every listener is bound
with SO_REUSEPORT; each UDP listener joins the Call-ID steering program and gets a second
"emergency" socket on the same address, drained before every batch of the normal one and after
every few datagrams of it; and a message read on an inbound stream connection goes to the
worker owning its Call-ID (:mod:`handoff`). Without a role none of this costs anything per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, cast

from clearip.relay.sip.badrequest import build_bad_request
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.framing import PING_BYTES, PONG, Ping, StreamFramer
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.parser import DEFAULT_LIMITS, Limits, parse_message
from clearip.relay.transport.handoff import LOCAL_CONN_LIMIT, Handoff
from clearip.relay.transport.peer import (
    STREAM_TRANSPORTS,
    ListenerSpec,
    LocalAddress,
    Peer,
    response_peer,
)
from clearip.relay.transport.tls import ClientTls, FailureLog, failure_reason
from clearip.relay.transport.udp import SO_TIMESTAMPNS, UdpSocket

if TYPE_CHECKING:  # worker_role imports this package
    from clearip.relay.service.worker_role import WorkerRole

log = logging.getLogger("clearip.transport")

__all__ = ["SipEndpoint", "StreamConnection", "response_peer"]

Handler = Callable[[Request | Response, Peer], None]
# A tracer sees every parsed message in ("in") and every message out ("out"), with the peer.
Tracer = Callable[[str, Message, Peer], None]
SendErrorHandler = Callable[[Message, Peer, str], None]

_IP_RECVTOS = getattr(socket, "IP_RECVTOS", 13)
_IPV6_RECVTCLASS = getattr(socket, "IPV6_RECVTCLASS", 66)


@functools.lru_cache(maxsize=4096)
def is_ip(host: str) -> bool:
    """True for a literal IPv4/IPv6 address (cached: it is asked for every UDP send)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _bind_udp(family: int, address: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking UDP listener socket (SO_REUSEPORT: one of a worker group)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVTCLASS, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTOS, 1)
        with contextlib.suppress(OSError):  # arrival times: the overload signal
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


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


class SipEndpoint:
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
        self._tls_failures = FailureLog()
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
        self.connections: dict[int, StreamConnection] = {}
        self._by_address: dict[tuple[str, str, int], StreamConnection] = {}
        self._per_source: Counter[str] = Counter()
        self._inbound = 0  # inbound connections (what max_connections bounds)
        self._connecting: dict[tuple[str, str, int], asyncio.Task[StreamConnection]] = {}
        self.udp_sockets: list[UdpSocket] = []
        self._servers: list[asyncio.AbstractServer] = []
        self.locals: list[LocalAddress] = []
        self._route_cache: dict[str, str] = {}
        self._local_cache: dict[tuple[str, str | None, bool, int], LocalAddress] = {}
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
            sock = _bind_udp(family, spec.address, spec.port, reuse_port=worker is not None)
            bound = sock.getsockname()[:2]
            local = LocalAddress("udp", spec.advertise or bound[0], bound[1])
            udp = UdpSocket(self, sock, local)
            pin_dir = worker.steering_dir(spec) if worker is not None else ""
            if pin_dir:
                try:
                    udp.emergency = self._join_steering(udp, pin_dir)
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

    def _join_steering(self, udp: UdpSocket, pin_dir: str) -> UdpSocket:
        """Join the steering program pinned at ``pin_dir`` (loaded by the supervisor) with the
        normal socket and a new emergency socket on the same address (returned).
        Raises SteeringUnavailable saying what failed and how to fix it."""
        from clearip.bpf.reuseport import SteeringUnavailable, WorkerSteering

        assert self.worker is not None
        index = self.worker.index
        host, port = udp.sock.getsockname()[:2]
        where = f"UDP listener {udp.local.hostport()} (worker {index}, steering at {pin_dir})"
        try:
            esock = _bind_udp(udp.family, host, port, reuse_port=True)
        except OSError as exc:
            raise SteeringUnavailable(
                f"{where}: cannot bind the emergency socket: {exc}",
                "check that every socket on that port is bound with SO_REUSEPORT by the same user",
            ) from None
        try:
            steering = WorkerSteering.open(pin_dir)
            try:
                steering.attach(udp.sock)
                steering.register(udp.sock, index)
                steering.register(esock, index, emergency=True)
            finally:
                steering.close()
        except SteeringUnavailable as exc:
            esock.close()
            raise SteeringUnavailable(f"{where}: {exc.reason}", exc.fix) from None
        except ValueError as exc:  # the program was loaded for fewer workers
            esock.close()
            raise SteeringUnavailable(
                f"{where}: {exc}", "load the program with workers = the worker count"
            ) from None
        except OSError as exc:
            esock.close()
            raise SteeringUnavailable(
                f"{where}: cannot join the steering program: {exc}",
                "run the worker as root (CAP_BPF, CAP_NET_ADMIN) with /sys/fs/bpf readable",
            ) from None
        return UdpSocket(self, esock, udp.local)

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

    # -- connections --------------------------------------------------------------------------
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
        timeout: float = 5.0,
    ) -> Peer:
        """Open (or reuse) a stream connection to ``peer``; returns the peer with its conn id.

        For TLS, ``server_name`` (default: the peer's host) is sent as SNI and checked against
        the certificate; ``context`` (default: the carriers' policy) says whom to trust.
        """
        conn = await self._connection_to(
            peer, server_name=server_name, context=context, timeout=timeout
        )
        return conn.peer

    async def _connection_to(
        self,
        peer: Peer,
        *,
        server_name: str | None = None,
        context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> StreamConnection:
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
        self,
        peer: Peer,
        server_name: str | None,
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> StreamConnection:
        loop = asyncio.get_running_loop()
        name = None
        if peer.transport == "tls":
            name = server_name or peer.host
            if context is None:
                context = self.tls_client(peer, name)
        else:
            context = None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(self, peer.transport, inbound=False),
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
            conn = await self._connection_to(peer.without_conn())
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
