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

Packets (one SIP message each, big-endian; :func:`encode` / :func:`decode`)::

    version 0xC1 | kind | worker u16 | conn u32 | transport | port u16 | host length | host | data

``(worker, conn)`` always names the stream connection: the worker holding it and its id
there. ``kind`` is MESSAGE (received on that connection: handle it), WRITE (send ``data`` on
it) or CLOSED (it is gone; no data). ``transport`` is 1 = tcp, 2 = tls; ``host``/``port`` are
the remote end of the connection. :func:`decode` refuses anything :func:`encode` cannot make.

Sockets: each worker listens on ``WorkerRole.handoff_path()`` (mode 0600) with
SOCK_SEQPACKET and connects to a sibling on first use, so each ordered pair of workers has
one connection: packets keep their order, and flow control counts bytes (SO_SNDBUF), not
packets. (An unconnected SOCK_DGRAM receiver refuses more than net.unix.max_dgram_qlen
packets, 10 by default: one TCP read of pipelined requests would overflow it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clearip.bpf.steering import MAX_WORKERS, call_id_hash
from clearip.relay.transport.peer import Peer

if TYPE_CHECKING:
    from clearip.relay.transport.endpoint import SipEndpoint
    from clearip.relay.transport.stream import StreamConnection
    from clearip.relay.worker_role import WorkerRole

log = logging.getLogger("clearip.transport.handoff")

VERSION = 0xC1
LOCAL_CONN_LIMIT = 1 << 32  # local connection ids are below; remote_conn() values above
_HEADER = struct.Struct("!BBHIBHB")
HEADER_MAX = _HEADER.size + 255
_TRANSPORTS = {"tcp": 1, "tls": 2}
_TRANSPORT_NAMES = {code: name for name, code in _TRANSPORTS.items()}
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n \t]+)", re.I)

SOCKET_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
RECV_BATCH = 64
RETRY_AFTER = 0.1  # seconds before connecting again to a sibling that was not there
CLOSED_REMEMBERED = 4096


class Kind(enum.IntEnum):
    MESSAGE = 1
    WRITE = 2
    CLOSED = 3


class HandoffError(ValueError):
    """A packet this module would not have encoded."""


@dataclass(frozen=True, slots=True)
class Packet:
    kind: Kind
    worker: int  # the worker holding the connection
    conn: int  # its id there (below LOCAL_CONN_LIMIT)
    transport: str  # "tcp" or "tls"
    host: str
    port: int
    data: bytes = b""


def encode(packet: Packet) -> bytes:
    """The packet's bytes; ValueError for fields the format cannot carry."""
    host = packet.host.encode()
    if packet.transport not in _TRANSPORTS:
        raise ValueError(f"hand-off is for stream transports, not {packet.transport!r}")
    if len(host) > 255:
        raise ValueError("host longer than 255 bytes")
    if not 0 <= packet.worker < MAX_WORKERS or not 0 <= packet.conn < LOCAL_CONN_LIMIT:
        raise ValueError(f"no such connection ({packet.worker}, {packet.conn})")
    if (packet.kind is Kind.CLOSED) == bool(packet.data):
        raise ValueError("CLOSED carries no data, MESSAGE and WRITE carry some")
    header = _HEADER.pack(
        VERSION,
        packet.kind,
        packet.worker,
        packet.conn,
        _TRANSPORTS[packet.transport],
        packet.port,
        len(host),
    )
    return header + host + packet.data


def decode(raw: bytes | memoryview) -> Packet:
    """The packet in ``raw``; HandoffError when it is not one :func:`encode` makes."""
    if len(raw) < _HEADER.size:
        raise HandoffError(f"packet of {len(raw)} bytes is shorter than the header")
    version, kind, worker, conn, transport, port, host_len = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise HandoffError(f"unknown packet version {version:#x}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise HandoffError(f"unknown packet kind {kind}") from None
    name = _TRANSPORT_NAMES.get(transport)
    if name is None:
        raise HandoffError(f"unknown transport code {transport}")
    if worker >= MAX_WORKERS:
        raise HandoffError(f"worker {worker} out of range")
    start = _HEADER.size + host_len
    if len(raw) < start:
        raise HandoffError("packet shorter than its host")
    data = bytes(raw[start:])
    if (kind is Kind.CLOSED) == bool(data):
        raise HandoffError("CLOSED carries no data, MESSAGE and WRITE carry some")
    try:
        host = bytes(raw[_HEADER.size : start]).decode()
    except UnicodeDecodeError:
        raise HandoffError("host is not UTF-8") from None
    return Packet(kind, worker, conn, name, host, port, data)


def remote_conn(worker: int, conn: int) -> int:
    """The ``Peer.conn`` of connection ``conn`` held by ``worker``, as other workers see it."""
    return (worker + 1) << 32 | conn


def split_conn(conn: int) -> tuple[int, int] | None:
    """(worker, conn id) of a :func:`remote_conn` value; None for a local connection id."""
    if conn < LOCAL_CONN_LIMIT:
        return None
    return (conn >> 32) - 1, conn & (LOCAL_CONN_LIMIT - 1)


def call_id_of(message: bytes) -> bytes | None:
    """The Call-ID value of one framed message (its first Call-ID header, ``i`` included)."""
    end = message.find(b"\r\n\r\n")
    match = _CALL_ID.search(message, 0, end + 2 if end >= 0 else len(message))
    return match.group(1) if match else None


def owner_of(message: bytes, workers: int) -> int | None:
    """The worker owning this message's call (:func:`clearip.bpf.steering.worker_for`)."""
    value = call_id_of(message)
    return None if value is None else call_id_hash(value) % workers


# -- the asyncio shell ------------------------------------------------------------------------


def _buffers(sock: socket.socket) -> None:
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:  # not root: as much as net.core.[wr]mem_max allows
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


class Channel:
    """This worker's SOCK_SEQPACKET listener and its connections to its siblings."""

    def __init__(
        self,
        role: WorkerRole,
        on_packet: Callable[[Packet], None],
        on_bad: Callable[[str], None],
        buffer_size: Callable[[], int],
    ) -> None:
        self.role = role
        self.on_packet = on_packet
        self.on_bad = on_bad
        self.buffer_size = buffer_size
        self.path = role.handoff_path()
        self._listener: socket.socket | None = None
        self._inode = 0
        self._incoming: set[socket.socket] = set()
        self._out: dict[int, socket.socket] = {}
        self._absent_until: dict[int, float] = {}
        self._buffer = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Listen at the role's hand-off path; OSError naming the path when that fails."""
        loop = asyncio.get_running_loop()
        path = self.path
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
            except OSError:
                pass  # nobody listens there: a stale path (or none) from an earlier run
            else:
                raise OSError(
                    errno.EADDRINUSE,
                    f"another worker {self.role.index} is listening at {path}: "
                    "is a second supervisor running with the same run directory?",
                )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(MAX_WORKERS)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen for hand-offs at {path}: {exc}") from None
        listener.setblocking(False)
        self._inode = os.stat(path).st_ino
        self._listener = listener
        self._loop = loop
        loop.add_reader(listener, self._accept)

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("hand-off accept failed: %s", exc)
                return
            sock.setblocking(False)
            _buffers(sock)
            self._incoming.add(sock)
            self._loop.add_reader(sock, self._readable, sock)

    def _readable(self, sock: socket.socket) -> None:
        size = self.buffer_size()
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        buffer = self._buffer
        view = memoryview(buffer)
        for _ in range(RECV_BATCH):
            try:
                n = sock.recv_into(buffer, 0, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("hand-off receive failed: %s", exc)
                n = 0
            if n == 0:  # the sibling closed its end (it stopped or restarted)
                self._drop_incoming(sock)
                return
            if n > len(buffer):
                self.on_bad(f"packet of {n} bytes truncated to {len(buffer)}")
                continue
            try:
                packet = decode(view[:n])
            except HandoffError as exc:
                self.on_bad(str(exc))
                continue
            self.on_packet(packet)

    def _drop_incoming(self, sock: socket.socket) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
        self._incoming.discard(sock)
        sock.close()

    def _connect(self, worker: int) -> socket.socket | None:
        now = time.monotonic()
        if self._absent_until.get(worker, 0.0) > now:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _buffers(sock)
        sock.setblocking(False)
        try:
            sock.connect(self.role.handoff_path(worker))
        except OSError:  # ENOENT, ECONNREFUSED: not running; EAGAIN: its backlog is full
            sock.close()
            self._absent_until[worker] = now + RETRY_AFTER
            return None
        self._out[worker] = sock
        return sock

    def send(self, worker: int, raw: bytes) -> bool:
        """Queue one packet for ``worker``; False when it is not running or its queue is full."""
        for _attempt in range(2):
            sock = self._out.get(worker)
            if sock is None:
                if self._listener is None:
                    return False  # closed
                sock = self._connect(worker)
                if sock is None:
                    return False
            try:
                sock.send(raw, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False  # its queue is full: not worth waiting for
            except OSError as exc:
                # EPIPE, ECONNRESET: that worker stopped (or restarted: connect again, once).
                del self._out[worker]
                sock.close()
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    log.debug("hand-off to worker %d failed: %s", worker, exc)
                    return False
                continue
            return True
        return False

    def close(self) -> None:
        loop = self._loop
        for sock in list(self._incoming):
            self._drop_incoming(sock)
        for sock in self._out.values():
            sock.close()
        self._out.clear()
        if self._listener is not None:
            if loop is not None:
                loop.remove_reader(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:  # still ours, not a successor's
                    os.unlink(self.path)


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
        value = call_id_of(data)
        if value is None:
            return False
        owner = call_id_hash(value) % self.workers
        if owner == self.index or conn.id >= LOCAL_CONN_LIMIT:
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
